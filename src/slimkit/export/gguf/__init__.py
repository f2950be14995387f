"""Export to GGUF (llama.cpp), as a small package:

- `architectures.py`: transformers model types -> llama.cpp architectures, what is refused, row orders;
- `hparams.py`: the hyperparameter keys; `tokenizer.py`: a Hugging Face tokenizer as llama.cpp's;
  `description.py`: `general.*` (and the tokenizer) copied from a source GGUF or read from a card;
- `types.py`: the GGML type of each tensor and its blocks (codes kept, or fitted);
- `tensors.py`: the tensors, found through the adapter's roles, in llama-quantize's order;
- `writer.py`: `export_gguf`, which joins them.
"""

from slimkit.export.gguf.types import QTYPES
from slimkit.export.gguf.writer import GGUFWritten, check_gguf_export, export_gguf

__all__ = ["GGUFWritten", "QTYPES", "check_gguf_export", "export_gguf"]
