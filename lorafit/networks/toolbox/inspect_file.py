"""``lorafit inspect FILE``: what a network file is, without loading any model.

Family (from the file's records, else its names; exact with ``--base``), format, network kind(s),
module count per component, rank/alpha per block, the training metadata kohya and lorafit write
(``ss_*``, ``modelspec.*``; diffusers files: the PEFT config in ``lora_adapter_metadata``), the
caption tags the LoRA was trained on (``ss_tag_frequency``), and its hashes: SHA-256 of the file
(civitai's AutoV2 is its first 10 characters) and of the tensor data after the header, which
A1111 shows as the LoRA's hash (and civitai as AutoV3) and kohya records as ``sshs_model_hash``.
``--json`` prints all of it, every module included, as one JSON object for scripts.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from lorafit.families.registry import get_family
from lorafit.networks.embedding_files import embedding_names
from lorafit.networks.toolbox.base_layout import base_layout
from lorafit.networks.toolbox.blocks import block_of, block_order
from lorafit.networks.toolbox.file_family import family_is_guessed
from lorafit.networks.toolbox.network_file import read_network

# Long JSON values summarised on the terminal (``--json`` has them whole).
_LONG = ("ss_tag_frequency", "ss_dataset_dirs", "ss_bucket_info", "ss_datasets", "lora_adapter_metadata")
_KIND_NAMES = {"lora": "LoRA", "locon": "LoCon", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}


def file_hashes(path: Path) -> dict[str, str]:
    """SHA-256 of the whole file and of its tensor data (after the safetensors header)."""
    whole, data = hashlib.sha256(), hashlib.sha256()
    with path.open("rb") as handle:
        header = handle.read(8)
        whole.update(header)
        length = int.from_bytes(header, "little")
        head = handle.read(length)
        whole.update(head)
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            whole.update(chunk)
            data.update(chunk)
    return {
        "sha256": whole.hexdigest(),
        "autov2": whole.hexdigest()[:10],
        "tensor_sha256": data.hexdigest(),
        "a1111_shorthash": data.hexdigest()[:12],
    }


def _kind(module, shape) -> str:
    """LoRA on a convolution with a kernel larger than 1x1 is LoCon (kohya's conv_dim)."""
    if module.kind == "lora" and len(shape) == 4 and tuple(shape[2:]) != (1, 1):
        return "locon"
    return module.kind


def _span(values) -> str:
    found = sorted(set(values))
    text = [f"{v:g}" if isinstance(v, float) else str(v) for v in found]
    return text[0] if len(text) == 1 else f"{text[0]}-{text[-1]}"


def tag_counts(metadata: dict[str, str]) -> Counter:
    """Caption tags over every dataset of ``ss_tag_frequency`` (kohya: {dataset: {tag: count}})."""
    try:
        frequency = json.loads(metadata.get("ss_tag_frequency", "{}"))
    except json.JSONDecodeError:
        return Counter()
    counts: Counter = Counter()
    for tags in frequency.values() if isinstance(frequency, dict) else ():
        if isinstance(tags, dict):
            counts.update({str(tag).strip(): int(n) for tag, n in tags.items()})
    return counts


def describe(file: str, base: str | None = None, single_file_config: str | None = None) -> dict:
    """Everything ``inspect`` shows, as a JSON-ready dict."""
    path = Path(file)
    layout = base_layout(base, single_file_config) if base else None
    network = read_network(path, layout)
    modules = []
    for name, module in network.modules.items():
        try:
            shape = tuple(network.weight_shape(name, module))
        except Exception:  # noqa: BLE001 -- a LoHa without --base: its shape is unknown, the rest is not
            shape = ()
        modules.append(
            {
                "name": name,
                "block": block_of(name, network.family),
                "kind": _kind(module, shape),
                "rank": module.rank,
                "alpha": float(module.alpha),
                "shape": list(shape),
            }
        )
    blocks = {}
    for m in modules:
        blocks.setdefault(m["block"], []).append(m)
    components = Counter(
        m["name"].split(".")[0] if network.format == "diffusers" else _component(m["name"]) for m in modules
    )
    return {
        "file": str(path),
        "size_bytes": path.stat().st_size,
        **file_hashes(path),
        "family": network.family,
        "family_title": get_family(network.family).title if network.family else None,
        "family_guessed": layout is None and family_is_guessed(list(network.modules), network.metadata),
        "format": network.format,
        "kinds": sorted({m["kind"] for m in modules}, key=list(_KIND_NAMES).index),
        "dtype": str(network.dtype()).removeprefix("torch."),
        "components": dict(components),
        "blocks": [
            {
                "block": block,
                "modules": len(group),
                "kinds": sorted({m["kind"] for m in group}, key=list(_KIND_NAMES).index),
                "rank": _span(m["rank"] for m in group if m["rank"] is not None)
                if any(m["rank"] for m in group)
                else "full",
                "alpha": _span(m["alpha"] for m in group),
            }
            for block, group in sorted(blocks.items(), key=lambda item: block_order(item[0]))
        ],
        "modules": modules,
        "metadata": network.metadata,
        "tags": dict(tag_counts(network.metadata).most_common()),
        "embeddings": {
            name: [list(t.shape) for k, t in sorted(network.embeddings.items()) if k.split(".")[1] == name]
            for name in embedding_names(network.embeddings)
        },
    }


def _component(stem: str) -> str:
    for prefix in ("lora_te1_", "lora_te2_", "lora_te_", "lora_unet_", "lora_transformer_", "lycoris_"):
        if stem.startswith(prefix):
            return prefix.removeprefix("lora_").removesuffix("_")
    return stem.split("_")[0]


def _lines(info: dict, tags: int, every_module: bool) -> list[str]:
    size = info["size_bytes"] / 2**20
    family = info["family_title"] or "unknown"
    if info["family_guessed"]:
        family += " (guessed from key names: SD1 and SD2 files look alike; pass --base to be sure)"
    kinds = ", ".join(_KIND_NAMES.get(k, k) for k in info["kinds"])
    lines = [
        f"file      {info['file']}  ({size:.1f} MiB, {info['dtype']})",
        f"hashes    sha256 {info['sha256']} (AutoV2 {info['autov2']})",
        f"          tensor data sha256 {info['tensor_sha256']} (A1111 {info['a1111_shorthash']}, civitai AutoV3)",
        f"family    {family}",
        f"format    {info['format']}"
        + ("  (A1111, ComfyUI, Forge, kohya)" if info["format"] == "kohya" else "  (diffusers/PEFT)"),
        f"network   {kinds}; {len(info['modules'])} modules: "
        + ", ".join(f"{c} {n}" for c, n in info["components"].items()),
        "",
        f"  {'block':<6} {'modules':>7}  {'kind':<10} {'rank':>7}  {'alpha':>9}",
    ]
    for b in info["blocks"]:
        lines.append(f"  {b['block']:<6} {b['modules']:>7}  {'+'.join(b['kinds']):<10} {b['rank']:>7}  {b['alpha']:>9}")
    if info["embeddings"]:  # pivotal tuning: A1111's bundle_emb keys
        lines += ["", "embeddings (bundled; A1111/Forge load them with the LoRA):"]
        lines += [f"  {name}: {' + '.join(map(str, shapes))}" for name, shapes in info["embeddings"].items()]
    if every_module:
        lines += ["", "modules:"]
        lines += [
            f"  {m['name']}  {m['kind']} rank {m['rank']} alpha {m['alpha']:g} {m['shape']}" for m in info["modules"]
        ]
    meta = info["metadata"]
    if meta:
        lines += ["", "metadata:"]
        for key in sorted(meta):
            value = meta[key]
            if key in _LONG:
                value = f"({len(value)} characters of JSON; --json shows it)"
            elif len(value) > 120:
                value = value[:117] + "..."
            lines.append(f"  {key} = {value}")
        peft = _peft_summary(meta.get("lora_adapter_metadata"))
        if peft:
            lines.append(f"  (lora_adapter_metadata: {peft})")
        recorded = meta.get("sshs_model_hash")
        if recorded and recorded != info["tensor_sha256"]:
            lines.append("  (sshs_model_hash does not match the tensors: the file was changed after it was recorded)")
    if info["tags"]:
        shown = list(info["tags"].items())[:tags]
        lines += [
            "",
            f"tags ({len(info['tags'])}, most frequent first):",
            "  " + ", ".join(f"{t} ({n})" for t, n in shown),
        ]
    return lines


def _peft_summary(text: str | None) -> str:
    """diffusers' PEFT config per component, in a few words: rank, alpha, DoRA, per-module patterns."""
    try:
        config = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return ""
    parts = []
    for component in sorted({key.partition(".")[0] for key in config}):
        get = {key.partition(".")[2]: value for key, value in config.items() if key.startswith(f"{component}.")}.get
        patterns = len(get("rank_pattern") or {}) + len(get("alpha_pattern") or {})
        text = f"{component}: r {get('r')}, lora_alpha {get('lora_alpha')}"
        text += ", DoRA" if get("use_dora") else ""
        text += f", {patterns} per-module rank/alpha entries" if patterns else ""
        parts.append(text)
    return "; ".join(parts)


def inspect(
    file: str,
    base: str | None = None,
    single_file_config: str | None = None,
    json: bool = False,
    tags: int = 30,
    modules: bool = False,
) -> dict:
    """Show what a LoRA file is: family, format, type, modules, rank/alpha per block, metadata, tags, hashes.

    Args:
        file: The network file (kohya/LyCORIS or diffusers format).
        base: The base model (directory, hub id or single file; configs only): the family for certain
            and module shapes of LoHa files.
        single_file_config: For a single-file ``base``: a diffusers directory of the same architecture.
        json: Print everything (every module, the whole metadata) as one JSON object instead.
        tags: How many of the most frequent training tags to show.
        modules: Also list every module with its kind, rank, alpha and shape.
    """
    import json as json_module

    info = describe(file, base, single_file_config)
    if json:
        print(json_module.dumps(info, indent=1))
    else:
        print("\n".join(_lines(info, tags, modules)))
    return info
