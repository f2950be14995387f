import json

import pytest
import torch

from slimkit.data import calibration_windows, file_documents, load_split, split_documents, wiki_documents
from slimkit.errors import DataError


def test_wiki_split_is_disjoint_and_complete(split):
    cal = {d.title for d in split.calibration}
    ev = {d.title for d in split.evaluation}
    assert not cal & ev
    assert len(cal) + len(ev) == len(wiki_documents())
    assert 0.07 < len(ev) / (len(ev) + len(cal)) < 0.13


def test_split_is_deterministic(split):
    again = split_documents(wiki_documents(), split.source)
    assert again.split_hash == split.split_hash
    assert [d.title for d in again.evaluation] == [d.title for d in split.evaluation]


def test_split_hash_changes_with_the_data(split):
    docs = wiki_documents()
    docs[0] = type(docs[0])(docs[0].title, docs[0].text + " edited")
    assert split_documents(docs, split.source).split_hash != split.split_hash


def test_user_text_and_jsonl(tmp_path):
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n\n".join(f"Paragraph number {i} about something." for i in range(50)))
    s = load_split(str(txt))
    assert len(s.calibration) + len(s.evaluation) == 50 and s.evaluation
    jl = tmp_path / "corpus.jsonl"
    jl.write_text("\n".join(json.dumps({"text": f"Line {i} of text."}) for i in range(40)))
    assert len(file_documents(jl)) == 40


def test_bad_jsonl_names_the_line(tmp_path):
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        file_documents(jl)


def test_calibration_windows_are_seeded(tmp_path, char_tokenizer):
    txt = tmp_path / "c.txt"
    txt.write_text("\n\n".join(f"Document {i}: " + "lorem ipsum dolor sit amet " * 20 for i in range(60)))
    s = load_split(str(txt))
    a = calibration_windows(char_tokenizer, s, n=6, seqlen=32, seed=1)
    b = calibration_windows(char_tokenizer, s, n=6, seqlen=32, seed=1)
    c = calibration_windows(char_tokenizer, s, n=6, seqlen=32, seed=2)
    assert a.shape == (6, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 0] == char_tokenizer.bos_token_id).all()


def test_calibration_windows_real_tokenizer(split, smollm2_tokenizer):
    w = calibration_windows(smollm2_tokenizer, split, n=4, seqlen=128, seed=0)
    assert w.shape == (4, 128) and (w[:, 0] == smollm2_tokenizer.bos_token_id).all()
    eval_text = " ".join(d.text for d in split.evaluation)
    # windows come from calibration documents, never evaluation ones
    assert smollm2_tokenizer.decode(w[0, 1:40]) not in eval_text
