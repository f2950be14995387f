"""Text for calibration and evaluation: the packaged corpus or the user's own file."""

from slimkit.data.corpus import Document, TextSplit, file_documents, load_split, split_documents, wiki_documents
from slimkit.data.tokens import calibration_windows, token_stream

__all__ = [
    "Document",
    "TextSplit",
    "calibration_windows",
    "file_documents",
    "load_split",
    "split_documents",
    "token_stream",
    "wiki_documents",
]
