"""Building what a learner rank trains: the policy, the frozen reference, and the DeepSpeed engine around them;
and the forward passes that read per-token logprobs (and values) out of them.

The policy is an HF causal LM, with a peft LoRA adapter or fully trainable, plus a scalar value head when the
objective wants one (head "lm+value"; it shares the backbone) -- or, for a reward model (head "classifier"), an HF
sequence classifier with one output, pooled at the last token as HF pools it when the saved model is loaded.
Under LoRA the reference is the same model with the adapter switched off; a full finetune keeps a frozen copy,
sharded like the policy under ZeRO-3. Rows packed with several examples (`rayalign.learner.packing`) carry
``segment_ids`` and ``position_ids``; their attention is kept inside each example: by running attention on each
example alone (`rayalign.learner.packing.segment_attention`, the LM's attention implementation), or by a 4D
block-causal mask where a model was loaded without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

from rayalign.config import LearnerConfig, LoraConfig


def causal_lm(model_path: str, dtype: Any) -> Any:
    """The HF causal LM the learner trains or keeps as the reference, loaded with `segment_attention` as its
    attention implementation (packed rows are read with spans; every other call is HF's SDPA)."""
    from transformers import AutoModelForCausalLM

    from rayalign.learner.packing import register_segment_attention

    return AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=dtype,
                                                attn_implementation=register_segment_attention())


def build_policy(model_path: str, learner: LearnerConfig, lora: LoraConfig, head: str = "lm") -> Any:
    import torch

    dtype = torch.bfloat16 if learner.dtype == "bfloat16" else torch.float32
    value_head = head == "lm+value"

    class Policy(torch.nn.Module):
        """The LM plus an optional scalar value head on its last hidden state (shared backbone), or a classifier."""

        def __init__(self, lm: torch.nn.Module, hidden_size: int):
            super().__init__()
            self.lm = lm
            self.head = head
            self.value_head = torch.nn.Linear(hidden_size, 1) if value_head else None
            if self.value_head is not None:
                torch.nn.init.normal_(self.value_head.weight, std=1e-3)
                torch.nn.init.zeros_(self.value_head.bias)

        def forward(self, input_ids, attention_mask, logits_to_keep=0, pairs=None, position_ids=None,
                    segment_spans=None):
            """(B, L) -> logits (B, L, V) (the last ``logits_to_keep`` positions only, when > 0),
            hidden (B, L, H) | None; a classifier's scores (B,) and None. ``attention_mask`` may be a 4D additive
            mask (packed rows, with their ``position_ids``), or packed rows' ``segment_spans`` with a mask of ones
            (`rayalign.learner.packing.segment_attention`). ``pairs`` = (response_start (B,), response_mask
            (B, T)) of rows that pair up on shared prompts: -> the response-aligned logits (B, T, V) and the
            response tokens (B, T), each prompt run once (`rayalign.learner.shared_prompt`)."""
            if self.head == "classifier":
                out = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                return out.logits[:, 0].float(), None
            if pairs is not None:
                from rayalign.learner.shared_prompt import paired_response_logits

                return paired_response_logits(self.lm, input_ids, *pairs)
            spans = {} if segment_spans is None else {"segment_spans": segment_spans}
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          logits_to_keep=logits_to_keep, output_hidden_states=self.value_head is not None,
                          use_cache=False, **spans)
            hidden = out.hidden_states[-1] if self.value_head is not None else None
            return out.logits, hidden

    if head == "classifier":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        # the head pools the last token that is not padding, as it will when `kind: reward_model` loads it
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        lm = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, torch_dtype=dtype,
                                                                pad_token_id=pad)
    else:
        lm = causal_lm(model_path, dtype)
    # no dropout: the old-policy pass (eval mode) and the training pass (train mode) must see the same function
    for module in lm.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    if learner.gradient_checkpointing:
        lm.gradient_checkpointing_enable()
        lm.enable_input_require_grads()
    if learner.finetune == "lora":
        from peft import LoraConfig as PeftLoraConfig, get_peft_model

        # a classifier's new head trains in full beside the adapter (peft's SEQ_CLS task would wrap it in a
        # modules_to_save copy, which the merged export would have to unwrap)
        task = None if head == "classifier" else "CAUSAL_LM"
        lm = get_peft_model(lm, PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                               target_modules=list(lora.target_modules), task_type=task))
        if head == "classifier":
            lm.get_base_model().score.requires_grad_(True)
    return Policy(lm, lm.config.hidden_size)


@dataclasses.dataclass
class TrainedModel:
    """One rank's models. ``engine`` wraps ``policy`` (DeepSpeed: optimizer, ZeRO, gradient accumulation);
    ``reference`` is None under LoRA (the adapter is switched off instead)."""

    policy: Any
    engine: Any
    reference: Any
    zero3: bool
    finetune: str
    head: str = "lm"
    packing: bool = False
    """Run each padded micro-batch's sequences packed into one row (`_packed_rows`; ``learner.packing``)."""

    @property
    def device(self) -> Any:
        return self.engine.device

    def gathered(self, params: list) -> Any:
        """Whole ``params`` inside the block on every rank (ZeRO-3: a collective all ranks must enter)."""
        if not self.zero3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params)


def build(model_path: str, learner: LearnerConfig, lora: LoraConfig, minibatch_size: int, world_size: int,
          head: str = "lm", with_reference: bool = True) -> TrainedModel:
    """The policy (and, for a full finetune with ``with_reference``, a frozen reference) inside DeepSpeed, with
    AdamW and a linear warm-up. ``minibatch_size`` sequences per optimizer step over ``world_size`` ranks."""
    import deepspeed
    import torch

    accumulation = minibatch_size // (learner.micro_batch_size * world_size)
    ds_config = {
        "train_micro_batch_size_per_gpu": learner.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": minibatch_size,
        "gradient_clipping": learner.max_grad_norm,
        "zero_optimization": {"stage": learner.zero_stage},
        "bf16": {"enabled": learner.dtype == "bfloat16"},
        "steps_per_print": 1 << 30,
    }
    zero3 = learner.zero_stage == 3
    hf_zero3 = None
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig

        deepspeed.init_distributed()  # on Ray Train's process group; zero.Init checks the batch sizes against it
        # while this object lives, from_pretrained loads each rank's shard only (deepspeed.zero.Init)
        hf_zero3 = HfDeepSpeedConfig(ds_config)
    policy = build_policy(model_path, learner, lora, head=head)
    reference = None
    if learner.finetune == "full" and with_reference:
        reference = causal_lm(model_path, policy.lm.dtype)
        reference.requires_grad_(False)
        if zero3:
            # sharded like the policy (loaded under HfDeepSpeedConfig); an engine without an optimizer gathers
            # each layer's weights for its forward and frees them after
            reference, _, _, _ = deepspeed.initialize(model=reference, config={
                key: ds_config[key] for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                                "train_batch_size", "zero_optimization", "bf16",
                                                "steps_per_print")})
        reference.eval()  # (a DeepSpeed engine's eval returns None)
    del hf_zero3

    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learner.lr, weight_decay=learner.weight_decay)
    warmup = learner.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
    engine, _, _, _ = deepspeed.initialize(model=policy, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    if reference is not None and not zero3:
        reference.to(engine.device)  # beside the policy (on GPU; ZeRO-3's engine placed its own)
    return TrainedModel(policy, engine, reference, zero3, learner.finetune, head, packing=learner.packing)


def _positions(mb: dict[str, Any], device: Any, lm: Any) -> tuple[Any, dict[str, Any], Any, int]:
    """input_ids (B, L) on ``device``; the attention arguments for the HF model ``lm``: the (B, L) mask, or for
    packed rows the position ids and, if ``lm`` runs `segment_attention`, each row's segment spans (the mask all
    ones), else the (B, 1, L, L) block-causal mask in its dtype; the (B, T) positions of the logits that predict
    each response token; and the first position whose logits are needed (the LM head then runs on the responses
    alone)."""
    from rayalign.learner.batch import logits_from, response_positions

    input_ids = mb["input_ids"].to(device)
    if "segment_ids" in mb:
        from rayalign.learner.packing import SEGMENT_ATTENTION, attention_bias, segment_spans

        attention = {"position_ids": mb["position_ids"].to(device)}
        if getattr(lm.config, "_attn_implementation", None) == SEGMENT_ATTENTION:
            attention.update(attention_mask=input_ids.new_ones(input_ids.shape),
                             segment_spans=segment_spans(mb["segment_ids"]))
        else:
            attention["attention_mask"] = attention_bias(mb["segment_ids"].to(device), lm.dtype)
    else:
        attention = {"attention_mask": mb["attention_mask"].to(device)}
    positions = response_positions(mb["response_start"].to(device), mb["response_mask"].shape[1],
                                   input_ids.shape[1])
    first = logits_from(positions, mb["response_mask"])
    return input_ids, attention, positions.clamp(min=first), first  # the clamp moves only padding rows'


def _paired(model: TrainedModel, mb: dict[str, Any], shared_prompt: bool) -> bool:
    """Whether this micro-batch runs its pairs' prompts once: asked for, rows that do pair up on their prompts,
    and not under ZeRO-3 (whose per-module gathers are not tried with two passes in one forward)."""
    from rayalign.learner.shared_prompt import shares_prompts

    return shared_prompt and not model.zero3 and shares_prompts(mb)


@contextlib.contextmanager
def _reference_lm(model: TrainedModel):
    """The reference as an HF LM: the frozen copy, or the policy's LM with its adapter off (inside the block)."""
    if model.reference is not None:
        yield model.reference
    else:
        with model.policy.lm.disable_adapter():
            yield model.policy.lm


def policy_forward(model: TrainedModel, mb: dict[str, Any], temperature: float,
                   shared_prompt: bool = False, with_logits: bool = True) -> tuple[Any, Any, Any]:
    """The policy's response logprobs (B, T), values (B, T) | None and temperature-scaled logits (B, T, V)
    (None unless ``with_logits``, where the path can skip them). ``shared_prompt``: rows 2i and 2i + 1 share
    their prompt (a paired objective); it runs once (`_paired`)."""
    from rayalign.learner.batch import gather_response, token_logprobs

    if model.policy.value_head is None and _paired(model, mb, shared_prompt):
        pairs = (mb["response_start"].to(model.device), mb["response_mask"].to(model.device))
        from rayalign.learner.shared_prompt import aligned_logprobs

        logits, targets = model.engine(mb["input_ids"].to(model.device), None, pairs=pairs)
        logprobs, selected = aligned_logprobs(logits, targets, temperature)
        return logprobs, None, selected
    if "segment_ids" in mb and model.policy.value_head is None:
        return _packed_logprobs(model, mb, temperature), None, None
    if _packs(model, mb):
        return _packed_rows(model, mb, temperature, model.engine, with_logits)
    input_ids, attention, positions, first = _positions(mb, model.device, model.policy.lm)
    logits, hidden = model.engine(input_ids, logits_to_keep=input_ids.shape[1] - first, **attention)
    logprobs, selected = token_logprobs(logits, input_ids, positions, temperature, first)
    values = None
    if hidden is not None:
        values = model.policy.value_head(gather_response(hidden, positions)).squeeze(-1).float()
    return logprobs, values, selected


def _packs(model: TrainedModel, mb: dict[str, Any]) -> bool:
    """Whether a padded micro-batch runs packed (`_packed_rows`): the learner packs (``learner.packing``) and the
    rows are not packed already."""
    return model.packing and "segment_ids" not in mb and "attention_mask" in mb


def _packed_rows(model: TrainedModel, mb: dict[str, Any], temperature: float, lm: Any,
                 with_logits: bool = True) -> tuple[Any, Any, Any]:
    """A padded micro-batch's logprobs (B, T), values (B, T) | None and logits (B, T, V) | None, from one forward
    over its sequences packed into a row (`rayalign.learner.packing.pack_micro_batch`): no compute on padding,
    each distinct prompt run once for all the responses to it (a GRPO group's), attention kept inside each
    (prompt, response), the LM head run only at the K distinct positions that predict a response token. ``lm``
    is the policy's engine (whose calls return (logits, hidden)) or an HF LM (the reference, whose calls return
    HF outputs). The results are gathered back to the padded layout, so the losses read them as
    they read the padded pass's."""
    import torch

    from rayalign.learner.packing import SEGMENT_ATTENTION, pack_micro_batch, span_bias

    packed = pack_micro_batch(mb)
    device = model.device
    input_ids = packed["input_ids"].to(device)
    attention = {"position_ids": packed["position_ids"].to(device)}
    if getattr(model.policy.lm.config, "_attn_implementation", None) == SEGMENT_ATTENTION:
        attention.update(attention_mask=torch.ones_like(input_ids), segment_spans=packed["spans"])
    else:
        bias = span_bias(packed["spans"], input_ids.shape[1], model.policy.lm.dtype)
        attention["attention_mask"] = bias.to(device)
    positions = packed["positions"].to(device)
    keep, index = torch.unique(positions, return_inverse=True)  # (K,) sorted, (B, T) into it
    hidden = None
    if lm is model.engine:
        logits, hidden = lm(input_ids, logits_to_keep=keep, **attention)
    else:
        logits = lm(input_ids=input_ids, logits_to_keep=keep, use_cache=False, **attention).logits
    scaled = logits[0].float() / temperature  # (K, V)
    logprobs = torch.log_softmax(scaled, dim=-1)[index, packed["targets"].to(device)]
    values = None
    if hidden is not None and model.policy.value_head is not None:
        values = model.policy.value_head(hidden[0, positions]).squeeze(-1).float()
    return logprobs, values, scaled[index] if with_logits else None


def _packed_logprobs(model: TrainedModel, mb: dict[str, Any], temperature: float) -> Any:
    """Packed rows' response logprobs (B, T), the LM head run only at the positions that predict a response token
    (a prompt's are context alone): HF's ``logits_to_keep`` as the (K,) positions any row needs, so the (B, K, V)
    logits and their log-softmax skip the prompts and the padding. Column t is predicted by position t
    (``response_start`` = 1); the others stay 0. No logits are returned (the entropy is not asked for here)."""
    import torch

    input_ids, attention, _, _ = _positions(mb, model.device, model.policy.lm)
    mask = mb["response_mask"].to(model.device)
    keep = mask.bool().any(dim=0).nonzero().squeeze(1)
    if len(keep) == 0:  # a micro-batch of padding rows
        keep = torch.zeros(1, dtype=torch.long, device=model.device)
    logits, _ = model.engine(input_ids, logits_to_keep=keep, **attention)
    targets = input_ids[:, keep + 1]
    picked = torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked.new_zeros(mask.shape).index_copy(1, keep, picked)


def reference_logprobs(model: TrainedModel, mb: dict[str, Any], temperature: float,
                       shared_prompt: bool = False) -> Any:
    """The reference's response logprobs (B, T): the frozen copy, or the policy with its adapter off."""
    from rayalign.learner.batch import token_logprobs

    if _paired(model, mb, shared_prompt):
        from rayalign.learner.shared_prompt import aligned_logprobs, paired_response_logits

        with _reference_lm(model) as lm:
            logits, targets = paired_response_logits(lm, mb["input_ids"].to(model.device),
                                                     mb["response_start"].to(model.device),
                                                     mb["response_mask"].to(model.device))
        return aligned_logprobs(logits, targets, temperature)[0]
    if _packs(model, mb):
        with _reference_lm(model) as lm:
            return _packed_rows(model, mb, temperature, lm, with_logits=False)[0]
    input_ids, attention, positions, first = _positions(mb, model.device, model.policy.lm)
    with _reference_lm(model) as lm:
        logits = lm(input_ids=input_ids, logits_to_keep=input_ids.shape[1] - first, use_cache=False,
                    **attention).logits
    return token_logprobs(logits, input_ids, positions, temperature, first)[0]


def forward_outputs(model: TrainedModel, mb: dict[str, Any], temperature: float, shared_prompt: bool = False) -> Any:
    """What the objective's loss reads (`rayalign.learner.objectives.Outputs`), by the model's head: a classifier's
    scores (B,), or the LM's response logprobs, logits and values (`policy_forward`)."""
    from rayalign.learner.objectives import Outputs

    if model.head == "classifier":
        scores, _ = model.engine(mb["input_ids"].to(model.device), mb["attention_mask"].to(model.device))
        return Outputs(scores=scores)
    logprobs, values, logits = policy_forward(model, mb, temperature, shared_prompt)
    return Outputs(logprobs, logits, values)
