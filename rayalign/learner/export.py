"""Getting weights out of a learner rank: as a plain HF state dict streamed one module at a time (for the engines
and the merged model), as a peft adapter, and as the final model saved in HF format.

Under ZeRO-3 each rank holds a shard of every weight, so exporting is collective: every rank runs these functions
to their end (gathering one layer at a time) while rank 0 alone keeps what they yield.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from rayalign.learner.model import TrainedModel


def adapter_params(model: TrainedModel) -> list:
    return [p for n, p in model.policy.lm.named_parameters() if ".lora_" in n]


def export_weights(model: TrainedModel) -> Iterator[tuple[str, Any]]:
    """(HF name, tensor) of the policy as a plain HF model, one module at a time: under LoRA the base weights
    with the adapter folded in, W + scale * (B @ A); the training model itself is left as it is. Under ZeRO-3
    each module's weights are gathered for the moment its tensors are yielded (copies, as the gathered
    storage is freed afterwards), so every rank must run the generator to its end. A tensor shared by two
    modules (tied input and output embeddings) is exported once, under its first name, as HF saves it."""
    import torch

    lm = model.policy.lm
    base = lm.get_base_model() if model.finetune == "lora" else lm
    lora_layers = {name for name, m in base.named_modules() if hasattr(m, "get_delta_weight")}
    exported: set[int] = set()
    for prefix, module in base.named_modules():
        if any(prefix.startswith(f"{layer}.") for layer in lora_layers):
            continue  # a LoRA layer's base_layer / lora_A / lora_B: exported with the layer
        if prefix in lora_layers:
            inner = module.get_base_layer()
            tensors = {k: v for k, v in inner._parameters.items() if v is not None}
            params = list(module.parameters())
        else:
            tensors = {k: v for k, v in module._parameters.items() if v is not None}
            tensors.update({k: v for k, v in module._buffers.items()
                            if v is not None and k not in module._non_persistent_buffers_set})
            params = list(module.parameters(recurse=False))
        if prefix in lora_layers and any(id(v) in exported for v in tensors.values()):
            raise ValueError(f"LoRA on {prefix}, whose weight is tied to a module exported before: not supported")
        tensors = {k: v for k, v in tensors.items() if id(v) not in exported}
        exported.update(id(v) for v in tensors.values())
        if not tensors:
            continue
        with torch.no_grad(), model.gathered(params):
            for key, tensor in tensors.items():
                tensor = tensor.detach()
                if prefix in lora_layers and key == "weight":
                    tensor = tensor + module.get_delta_weight("default").to(tensor.dtype)
                elif model.zero3:
                    tensor = tensor.clone()
                yield f"{prefix}.{key}" if prefix else key, tensor


def drain(weights: Iterator[Any]) -> None:
    """Run an export to its end without keeping anything (the other ranks' part of each ZeRO-3 gather)."""
    for _ in weights:
        pass


def publish_to_store(model: TrainedModel, rank: int, store: Callable[[], Any], version: int, format: str,
                     engine_dtype: Any) -> int:
    """Publish the policy as ``version`` into the `WeightStore` actor that ``store()`` returns: its adapter files
    (``format`` "adapter") or its full weights in shared-memory buckets ("full"). Every rank calls this (ZeRO-3
    gathers); rank 0 publishes and returns the bytes, the others 0. The store is looked up once the weights are
    out, so a failed lookup leaves no rank inside a gather."""
    import ray

    from rayalign.weights.store import adapter_payload, full_payload

    if format == "adapter":
        with model.gathered(adapter_params(model)):
            if rank != 0:
                return 0
            with tempfile.TemporaryDirectory(prefix="rayalign-adapter-") as d:
                model.policy.lm.save_pretrained(d)
                published = adapter_payload(version, d)
    elif format == "full":
        if rank != 0:
            drain(export_weights(model))
            return 0
        published = full_payload(version, export_weights(model), dtype=engine_dtype)
    else:
        raise ValueError(f"cannot publish weights in format {format!r} (expected 'adapter' or 'full')")
    ray.get(store().publish.remote(published))
    return published.nbytes


def save_model(model: TrainedModel, rank: int, output_dir: str, tokenizer_path: str) -> dict[str, str]:
    """Save the final policy in HF format: the adapter (LoRA; not for a classifier, whose head trains outside it)
    and the merged model with the tokenizer, plus the value head when there is one. Every rank calls this (ZeRO-3 gathers); rank 0 writes and returns the paths."""
    import torch
    from transformers import AutoTokenizer

    out = Path(output_dir)
    paths = {}
    if model.finetune == "lora" and model.head != "classifier":  # a classifier's adapter lacks its trained head
        with model.gathered(adapter_params(model)):
            if rank == 0:
                model.policy.lm.save_pretrained(out / "adapter")
                paths["adapter"] = str(out / "adapter")
    # tensors with their own storage (safetensors refuses views into DeepSpeed's flat buffers); ZeRO-3's are copies
    merged = ((name, t if model.zero3 else t.clone()) for name, t in export_weights(model))
    if rank != 0:
        drain(merged)
    else:
        lm = model.policy.lm
        base = lm.get_base_model() if model.finetune == "lora" else lm
        base.save_pretrained(out / "merged", state_dict=dict(merged))
        paths["merged"] = str(out / "merged")
    value_head = model.policy.value_head
    if value_head is not None:
        with model.gathered(list(value_head.parameters())):
            if rank == 0:
                # clone: under ZeRO the parameters are views into one flat buffer that torch.save would write
                torch.save({k: v.detach().clone() for k, v in value_head.state_dict().items()},
                           out / "value_head.pt")
                paths["value_head"] = str(out / "value_head.pt")
    if rank == 0:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        for kind in ("adapter", "merged"):
            if kind in paths:
                tokenizer.save_pretrained(paths[kind])
    return paths
