"""A sentence-transformers model's embedding recipe, read from its folder as feature-extraction job parameters.

A model saved by sentence-transformers carries how it makes one vector of a text: ``modules.json``
lists its modules (the transformer, a ``Pooling``, often a ``Normalize``), ``1_Pooling/config.json``
names the pooling, ``sentence_bert_config.json`` the longest input (``max_seq_length``) and
``config_sentence_transformers.json`` its named prompts and the one used by default. ``resolve``
turns that into the parameters of ``pipeq.embedding`` (``pooling``, ``normalize``, ``prompt``) and
transformers' ``tokenize_kwargs.max_length``, filling in each one a job leaves out, so that a job's
vectors are ``SentenceTransformer(model).encode(texts)``'s and its stored parameters say how they
were made. The producer resolves them at submit; a worker runs the parameters it is given.

A model without ``modules.json`` has no recipe: its jobs keep a vector per token unless they set
``pooling``. A recipe pipeq cannot run (a ``Dense`` module, a pooling other than mean, cls or max,
a lower-casing transformer, a prompt left out of pooling) is not followed, and says why.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from pipeq.embedding import POOLINGS, PROMPT, PROMPT_NAME
from pipeq.errors import ConfigurationError

log = logging.getLogger(__name__)

#: The modules pipeq runs, by the class name ``modules.json`` gives (any sentence-transformers version's path).
_TRANSFORMER, _POOLING, _NORMALIZE = "Transformer", "Pooling", "Normalize"
#: ``1_Pooling/config.json``'s boolean keys (sentence-transformers before 6) and the mode each means.
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


@dataclass(frozen=True)
class Recipe:
    """How a sentence-transformers model makes a text's vector, as far as pipeq reads it."""

    #: The pooling mode (``mean``, ``cls``, ``max``, or one pipeq does not run).
    pooling: str
    normalize: bool
    #: Tokens an input is cut to (``max_seq_length``); None: the tokenizer's own maximum.
    max_length: int | None = None
    #: Named prompts, and the name of the one used when a job names none.
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    #: Whether a prompt's tokens are pooled with the text's (sentence-transformers' default).
    include_prompt: bool = True
    #: Why pipeq cannot run this recipe; None when it can.
    unsupported: str | None = None

    def prompt(self, name: str | None) -> str:
        """The text of prompt ``name`` (the default prompt when None; '' when there is none)."""
        name = name if name is not None else self.default_prompt_name
        if name is None:
            return ""
        if name not in self.prompts:
            named = ", ".join(sorted(self.prompts)) or "none"
            raise ConfigurationError(f"prompt_name {name!r} is not one of the model's prompts ({named})")
        return self.prompts[name]


def _model_file(model: str, name: str) -> str | None:
    """The path of file ``name`` of a model folder, or of a hub model in the Hugging Face cache; None if absent."""
    if os.path.isdir(model):
        path = os.path.join(model, name)
        return path if os.path.isfile(path) else None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, name)
    except Exception:  # not a hub id at all
        return None
    return cached if isinstance(cached, str) else None


def _json(model: str, name: str) -> Any:
    path = _model_file(model, name)
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"model {model}: cannot read its {name}: {exc}") from None


def _pooling_mode(config: dict[str, Any]) -> str:
    """The one pooling mode of a Pooling config, either version's keys; several modes are named with a '+'."""
    mode = config.get("pooling_mode")
    if mode is None:
        modes = [m for key, m in _LEGACY_POOLING_KEYS.items() if config.get(key)] or ["mean"]
    else:
        modes = [mode] if isinstance(mode, str) else list(mode)
    return "+".join(map(str, modes))


def read_recipe(model: str) -> Recipe | None:
    """The recipe of ``model`` (a folder, or a hub id in the cache); None when it has no ``modules.json``."""
    modules = _json(model, "modules.json")
    if not isinstance(modules, list):
        return None
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules if isinstance(m, dict)]
    paths = {kind: str(m.get("path", "")) for kind, m in zip(kinds, modules, strict=False)}
    unsupported: list[str] = []
    others = [kind for kind in kinds if kind not in (_TRANSFORMER, _POOLING, _NORMALIZE)]
    if others or kinds[:1] != [_TRANSFORMER]:
        unsupported.append(f"its modules are {', '.join(kinds)}; pipeq runs a Transformer, a Pooling and a Normalize")
    pooling = "mean"
    include_prompt = True
    if _POOLING in paths:
        config = _json(model, os.path.join(paths[_POOLING], "config.json")) or {}
        pooling = _pooling_mode(config)
        include_prompt = bool(config.get("include_prompt", True))
        if pooling not in POOLINGS:
            unsupported.append(f"its pooling is {pooling}; pipeq pools by {', '.join(POOLINGS)}")
    elif not others:
        unsupported.append("it has no Pooling module")
    transformer = _json(model, "sentence_bert_config.json") or {}
    if transformer.get("do_lower_case"):
        unsupported.append("its transformer lower-cases texts (do_lower_case)")
    max_length = transformer.get("max_seq_length")
    settings = _json(model, "config_sentence_transformers.json") or {}
    prompts = settings.get("prompts") or {}
    return Recipe(
        pooling=pooling,
        normalize=_NORMALIZE in kinds,
        max_length=max_length if isinstance(max_length, int) and not isinstance(max_length, bool) else None,
        prompts={str(k): str(v) for k, v in prompts.items()} if isinstance(prompts, dict) else {},
        default_prompt_name=settings.get("default_prompt_name") or None,
        include_prompt=include_prompt,
        unsupported="; ".join(unsupported) or None,
    )


def resolve(model: str, params: dict[str, Any]) -> dict[str, Any]:
    """A feature-extraction job's parameters with its model's recipe filled in where the job leaves them out.

    ``pooling``, ``normalize``, ``prompt`` (from ``prompt_name``, else the model's default prompt) and
    ``tokenize_kwargs.max_length`` are the recipe's unless the job sets them; ``pooling: null`` keeps a
    vector per token. A model without a recipe, or with one pipeq cannot run, gets ``params`` as they are
    (a job that pools is then the job's own recipe).
    """
    recipe = read_recipe(model)
    resolved = dict(params)
    if recipe is None:
        if resolved.get(PROMPT_NAME) is not None:
            raise ConfigurationError(
                f"{PROMPT_NAME} names one of a sentence-transformers model's prompts, and {model} has none "
                f"(no modules.json); give the text itself as --param {PROMPT}=..."
            )
        return resolved
    if recipe.unsupported is not None:
        if "pooling" not in resolved:
            log.warning(
                "%s's sentence-transformers recipe is not followed (%s): its jobs get a vector per token "
                "unless they set pooling",
                model,
                recipe.unsupported,
            )
        return resolved
    resolved.setdefault("pooling", recipe.pooling)
    if resolved["pooling"] is not None and recipe.normalize:
        resolved.setdefault("normalize", True)
    if PROMPT not in resolved:
        prompt = recipe.prompt(resolved.get(PROMPT_NAME))
        if prompt:
            if not recipe.include_prompt and resolved["pooling"] is not None:
                raise ConfigurationError(
                    f"{model} pools without its prompt's tokens (include_prompt false), which pipeq does not do; "
                    f"set --param {PROMPT}= to embed without it"
                )
            resolved[PROMPT] = prompt
    if recipe.max_length is not None:
        tokenize = dict(resolved.get("tokenize_kwargs") or {})
        tokenize.setdefault("max_length", recipe.max_length)
        resolved["tokenize_kwargs"] = tokenize
    return resolved


def unfollowed(model: str) -> str | None:
    """Why ``model``'s recipe is not followed, None when it has none or pipeq follows it (for error messages)."""
    try:
        recipe = read_recipe(model)
    except ConfigurationError as exc:
        return str(exc)
    return None if recipe is None else recipe.unsupported
