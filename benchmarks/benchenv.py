"""What every benchmark sets before torch and transformers load: offline, quiet, and the tokenizer's
threads as a pipeq worker runs it (pipeq/logs.py), so the in-process loops tokenize under the same rule."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def write_block(path: "os.PathLike[str] | str", report: str, begin: str, end: str) -> None:
    """Put ``report`` between the ``begin``/``end`` markers of a results file, keeping everything else around
    them; a file without those markers gets the block appended."""
    from pathlib import Path

    file = Path(path)
    block = f"{begin}\n{report}\n{end}"
    text = file.read_text(encoding="utf-8") if file.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = f"{text.rstrip()}\n\n{block}\n" if text.strip() else block + "\n"
    file.write_text(text, encoding="utf-8")
