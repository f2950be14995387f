"""Issue 39's reproductions, run through the real `slimkit` process: a markdown table of each probe's
exit code, first message line, and whether the user's files survived.

    python tools/overwrite_probes.py                     # the installed slimkit
    PYTHONPATH=/tmp/before/src python tools/overwrite_probes.py   # another checkout's, for before/after

Each probe runs in a fresh temp dir on a tiny random LLaMA with SmolLM2's tokenizer; a probe that
runs past --timeout seconds is stopped and said so (the absurd-config probes report wall time and
peak RSS, measured by a parent process with no other child).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARKER = ".slimkit-output"
TINY = ["-r", "rtn-int8", "--windows", "1", "--seqlen", "32"]
PROBES = []


def probe(title):
    def register(fn):
        PROBES.append((title, fn))
        return fn
    return register


def run(*args, cwd=None, timeout=120):
    """(exit code or 'killed', first error line, seconds, peak RSS MB) of one slimkit process."""
    wrapper = ("import resource, subprocess, sys\n"
               "try:\n"
               f"    p = subprocess.run(sys.argv[1:], capture_output=True, text=True, stdin=subprocess.DEVNULL, "
               f"timeout={timeout})\n"
               "    code, err = p.returncode, p.stderr\n"
               "except subprocess.TimeoutExpired:\n"
               f"    code, err = 'killed at {timeout} s', ''\n"
               "print(repr((code, err, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)))\n")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", "slimkit.cli.main", *map(str, args)],
                         capture_output=True, text=True, cwd=cwd, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    code, err, rss_kb = eval(out.stdout.strip().splitlines()[-1])  # our own wrapper's repr
    lines = [x for x in err.splitlines() if x.startswith(("error:", "Error", "Traceback", "warning"))]
    first = next((x for x in lines if x.startswith("error:")), lines[0] if lines else (err.splitlines() or [""])[-1])
    return code, first, time.perf_counter() - start, rss_kb / 1024


def tiny_model(root: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimkit.models import load_model

    path = root / "m" / "tiny"
    tok = load_model("smollm2-135m").tokenizer
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def user_dir(where: Path) -> Path:
    (where / "photos").mkdir(parents=True)
    (where / "thesis.tex").write_text("years of work")
    (where / "photos" / "a.jpg").write_bytes(b"jpeg")
    return where


def kept(*paths: Path) -> str:
    return "kept" if all(p.exists() for p in paths) else "LOST"


@probe("marker touched in a user dir, compress --overwrite")
def planted(tiny, w):
    mine = user_dir(w / "thesis")
    (mine / MARKER).touch()
    return run("compress", tiny, *TINY, "-o", mine, "--overwrite"), kept(mine / "thesis.tex", mine / "photos" / "a.jpg")


@probe("user files added to a real output, compress --overwrite")
def added(tiny, w):
    out = w / "out"
    run("compress", tiny, *TINY, "-o", out)
    (out / "NOTES.md").write_text("mine")
    (out / "experiments").mkdir()
    (out / "experiments" / "run1.csv").write_text("1,2")
    return run("compress", tiny, *TINY, "-o", out, "--overwrite"), kept(out / "NOTES.md", out / "experiments")


@probe("-r OUT/my-recipe.yaml --data OUT/mydata.txt -o OUT --overwrite")
def inputs_inside(tiny, w):
    out = w / "out"
    run("compress", tiny, *TINY, "-o", out)
    (out / "my-recipe.yaml").write_text("steps:\n  - method: rtn_quantize\n    bits: 8\n")
    (out / "mydata.txt").write_text("\n\n".join(f"Paragraph {i} of my own text." for i in range(40)))
    result = run("compress", tiny, "-r", out / "my-recipe.yaml", "--data", out / "mydata.txt", "-o", out,
                 "--overwrite", "--windows", "1", "--seqlen", "32")
    return result, kept(out / "my-recipe.yaml", out / "mydata.txt")


def absurd_layers(source: Path, w: Path) -> Path:
    absurd = w / "absurd"
    shutil.copytree(source, absurd)
    config = json.loads((absurd / "config.json").read_text())
    (absurd / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**9}))
    return absurd


@probe("config num_hidden_layers 10**9, eval (HF dir)")
def layers_dir(tiny, w):
    return run("eval", absurd_layers(tiny, w), "--windows", "1", "--seqlen", "32", timeout=60), "-"


@probe("config num_hidden_layers 10**9, eval (packed dir)")
def layers_packed(tiny, w):
    run("pack", tiny, "--format", "int8", "-o", w / "p")
    return run("eval", absurd_layers(w / "p", w), "--windows", "1", "--seqlen", "32", timeout=60), "-"


@probe("GGUF export onto a full disk (2 MB tmpfs)")
def full_disk(tiny, w):
    mount = w / "mnt"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mount)], capture_output=True).returncode:
        return ("skipped", "cannot mount a tmpfs here", 0, 0), "-"
    try:
        return run("export", tiny, "--to", "gguf", "-o", mount / "g", "--no-verify"), \
            "clean" if not any(mount.iterdir()) else "partial left"
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@probe("packed int4 scale with 0 columns, eval")
def zero_columns(tiny, w):
    from safetensors import safe_open
    from safetensors.torch import save_file

    run("pack", tiny, "--format", "int4", "-o", w / "p")
    file = w / "p" / "packed.safetensors"
    with safe_open(str(file), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    key = "model.layers.0.mlp.down_proj.scale"
    tensors[key] = tensors[key][:, :0].clone()
    save_file(tensors, str(file), metadata=meta)
    return run("eval", w / "p", "--windows", "1", "--seqlen", "32"), "-"


@probe("-o with a non-UTF-8 byte in its name")
def non_utf8(tiny, w):
    return run("compress", tiny, *TINY, "-o", os.fsdecode(bytes(w) + b"/out-\xff")), "-"


@probe("-o through a symlink loop")
def loop(tiny, w):
    os.symlink(w / "b", w / "a")
    os.symlink(w / "a", w / "b")
    return run("compress", tiny, *TINY, "-o", w / "a" / "out"), "-"


@probe("lock file whose pid now belongs to another process")
def reused_pid(tiny, w):
    sleeper = subprocess.Popen(["sleep", "120"])
    try:
        (w / ".out.slimkit-lock").write_text(f"{sleeper.pid} 1\n")  # start time 1: not that process
        return run("compress", tiny, *TINY, "-o", w / "out"), "-"
    finally:
        sleeper.kill()


@probe("model: a dangling symlink")
def dangling(tiny, w):
    os.symlink(w / "gone", w / "link")
    return run("eval", "link", cwd=w), "-"


@probe("model: out/int4-typo (out/int4 exists)")
def typo(tiny, w):
    (w / "out" / "int4").mkdir(parents=True)
    return run("eval", "out/int4-typo", cwd=w), "-"


@probe("bench model with a missing second model")
def bench_missing(tiny, w):
    (w / "out").mkdir()
    return run("bench", "model", tiny, "out/int4", "--windows", "0", cwd=w), "-"


@probe("tokenizer that needs custom code, eval")
def custom_tokenizer(tiny, w):
    custom = w / "custom"
    shutil.copytree(tiny, custom)
    config = json.loads((custom / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]})
    (custom / "tokenizer_config.json").write_text(json.dumps(config))
    return run("eval", custom, "--windows", "1", "--seqlen", "32"), "-"


@probe("GGUF without tokenizer metadata, eval")
def bare_gguf(tiny, w):
    import gguf

    run("export", tiny, "--to", "gguf", "-o", w / "g", "--no-verify")
    keys = [k for k in gguf.GGUFReader(w / "g" / "model.gguf").fields if k.startswith("tokenizer.")]
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", "--force",
                    *[a for k in keys for a in ("--remove-metadata", k)], w / "g" / "model.gguf", w / "bare.gguf"],
                   check=True, capture_output=True)
    return run("eval", w / "bare.gguf", "--windows", "1", "--seqlen", "32"), "-"


@probe("export --to hf --type q4_k_m")
def ignored_type(tiny, w):
    return run("export", tiny, "--to", "hf", "--type", "q4_k_m", "-o", w / "x", "--no-verify"), "-"


@probe("recipe file 'name with space.yaml' without name:")
def unnamed(tiny, w):
    recipe = w / "name with space.yaml"
    recipe.write_text("steps:\n  - method: rtn_quantize\n    bits: 8\n")
    return run("compress", tiny, "-r", recipe, "-o", w / "o", "--windows", "1", "--seqlen", "32"), "-"


@probe("--data FILE.jsonl with a UTF-8 BOM")
def bom(tiny, w):
    data = w / "d.jsonl"
    lines = [json.dumps({"text": f"Paragraph {i} of my own text, long enough to count."}) for i in range(40)]
    data.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode())
    return run("compress", tiny, *TINY, "--data", data, "-o", w / "o"), "-"


@probe("distill steps: 10**15")
def forever(tiny, w):
    recipe = w / "forever.yaml"
    recipe.write_text("steps:\n  - method: distill\n    steps: 1000000000000000\n")
    return run("compress", tiny, "-r", recipe, "-o", w / "o", timeout=60), "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="only probes whose title contains this")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="slimkit-probes-") as root:
        tiny = tiny_model(Path(root))
        print("| probe | exit | s | peak RSS MB | first line | user files |\n|---|---|---|---|---|---|")
        for i, (title, fn) in enumerate(PROBES):
            if args.k not in title:
                continue
            work = Path(root) / f"p{i}"
            work.mkdir()
            (code, line, seconds, rss), files = fn(tiny, work)
            line = line.replace("|", "\\|")[:160]
            print(f"| {title} | {code} | {seconds:.1f} | {rss:.0f} | {line} | {files} |", flush=True)


if __name__ == "__main__":
    main()
