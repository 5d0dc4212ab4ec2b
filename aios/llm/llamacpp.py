"""The embedded engine: llama.cpp, many sequences decoded in one batch per step.

Uses llama.cpp's low-level API (the high-level ``Llama`` class only uses sequence 0): one model,
one context with ``n_seq_max = slots + cache_slots`` and one KV stream per sequence (or a unified
pool), one ``llama_batch`` per step. It runs in the kernel's process, or (by default) in a child
process of its own behind :class:`~aios.llm.isolated.IsolatedEngine`, whose parent keeps only a
:class:`LlamaTokenizer`. Every step runs on the owning core's thread; nothing here is
thread-safe, by design (tokenization only reads the vocabulary).
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from typing import Any

from aios.config import CoreConfig
from aios.errors import CoreError, InvalidRequest, ModelLoadError
from aios.llm import cpu
from aios.llm.engine import ContextStore, Sampled, SeqStart, StepPlan
from aios.llm.grammar import json_grammar
from aios.llm.isolated import Mark, Phase, no_mark
from aios.llm.models import resolve_model
from aios.syscall import Message

_DEFAULT_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: a random seed


_log_callback: Any = None  # must stay referenced while llama.cpp may call it


def _route_llama_logs(lc: Any) -> None:
    """Send llama.cpp's log lines to the ``aios.llama`` logger at debug level instead of raw
    stderr. Its levels are unreliable (benign warnings arrive as errors) and every real failure
    also shows as a return code that the engine turns into a typed error."""
    global _log_callback
    if _log_callback is not None:
        return
    log = logging.getLogger("aios.llama")

    @lc.llama_log_callback  # type: ignore[untyped-decorator]
    def callback(level: int, text: bytes, user_data: Any) -> None:
        log.debug("%s", text.decode(errors="replace").rstrip())

    _log_callback = callback
    lc.llama_log_set(callback, ctypes.c_void_p(0))


def apply_chat_template(lc: Any, template: bytes, messages: Sequence[Message]) -> bytes | None:
    """Render ``messages`` with a GGUF chat template (llama.cpp's built-in renderer), ending
    with the assistant's turn; ``None`` if llama.cpp does not know the template."""
    chat = (lc.llama_chat_message * len(messages))()
    keep = []  # the encoded strings must outlive the call
    for i, m in enumerate(messages):
        role, content = m.role.encode(), m.content.encode()
        keep += [role, content]
        chat[i].role, chat[i].content = role, content
    size = lc.llama_chat_apply_template(template, chat, len(messages), True, None, 0)
    if size < 0:
        return None
    buf = ctypes.create_string_buffer(size + 1)
    lc.llama_chat_apply_template(template, chat, len(messages), True, buf, size + 1)
    return buf.raw[:size]


def _llama() -> Any:
    """llama_cpp, imported on first use (so that `aios --help` never loads llama.cpp), with
    its logs routed and its backend initialized."""
    import llama_cpp as lc

    _route_llama_logs(lc)
    lc.llama_backend_init()
    return lc


class LlamaTokenizer:
    """A model's vocabulary and chat template: tokenization, detokenization of one token.

    :meth:`load` reads only the vocabulary of a GGUF file (``vocab_only``: no weights, no
    context), for the parent of an isolated engine; :class:`LlamaCppEngine` wraps the vocabulary
    of the model it loaded (and frees that model itself). Read-only: safe to use on the event
    loop while the core's thread decodes.
    """

    def __init__(self, lc: Any, model: Any, model_name: str, *, owns_model: bool) -> None:
        self._lc = lc
        self._model = model
        self._owns_model = owns_model
        self.model_name = model_name
        self.vocab = lc.llama_model_get_vocab(model)
        template = lc.llama_model_chat_template(model, None)
        self._template: bytes | None = template or None
        self._piece = ctypes.create_string_buffer(256)

    @classmethod
    def load(cls, config: CoreConfig) -> LlamaTokenizer:
        lc = _llama()
        path = resolve_model(config.model)
        mparams = lc.llama_model_default_params()
        mparams.vocab_only = True
        mparams.n_gpu_layers = 0
        model = lc.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            raise ModelLoadError(f"llama.cpp could not read the vocabulary of {path}")
        return cls(lc, model, config.model, owns_model=True)

    def tokenize(self, text: str) -> list[int]:
        return self._tokenize(text.encode(), parse_special=False)

    def tokenize_chat(self, messages: Sequence[Message]) -> list[int]:
        if self._template is None:
            raise InvalidRequest(
                f"model {self.model_name!r} has no chat template (a base model): "
                "send a completion 'prompt' instead of chat 'messages'"
            )
        prompt = apply_chat_template(self._lc, self._template, messages)
        if prompt is None:
            raise InvalidRequest(
                f"llama.cpp does not support the chat template of {self.model_name!r}"
            )
        # parse_special: the template's role markers (<|im_start|> ...) are special tokens.
        return self._tokenize(prompt, parse_special=True)

    def _tokenize(self, data: bytes, *, parse_special: bool) -> list[int]:
        lc = self._lc
        cap = len(data) + 8
        for _ in range(2):
            buf = (lc.llama_token * cap)()
            n = lc.llama_tokenize(self.vocab, data, len(data), buf, cap, True, parse_special)
            if n >= 0:
                return list(buf[:n])
            cap = -n
        raise CoreError("llama.cpp tokenization failed")

    def piece(self, token: int) -> bytes:
        """The bytes of one token (not thread-safe: one shared buffer; the core's thread)."""
        lc = self._lc
        n = lc.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, False)
        if n < 0:
            self._piece = ctypes.create_string_buffer(-n)
            n = lc.llama_token_to_piece(self.vocab, token, self._piece, -n, 0, False)
        return self._piece.raw[:n]

    def close(self) -> None:
        if self._owns_model and self._model is not None:
            self._lc.llama_model_free(self._model)
        self._model = None


class LlamaCppEngine:
    """An :class:`~aios.llm.engine.Engine` on llama.cpp (CPU). ``mark`` is called before each
    native call that could crash (see :mod:`aios.llm.isolated`)."""

    def __init__(self, config: CoreConfig, *, mark: Mark = no_mark) -> None:
        lc = _llama()
        self._lc = lc
        self._mark = mark
        path = resolve_model(config.model)
        # Before anything runs: a build this CPU would crash on is refused or loaded safely.
        plan = cpu.check(lc, allow_amx=config.amx)
        if plan.warning:
            logging.getLogger(__name__).warning("core %r: %s", config.name, plan.warning)
        mparams = lc.llama_model_default_params()
        mparams.n_gpu_layers = 0
        if not plan.extra_bufts:
            mparams.use_extra_bufts = False
        model = lc.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            raise ModelLoadError(f"llama.cpp could not load {path} (is it a GGUF file?)")
        self._model = model
        self.tokenizer = LlamaTokenizer(lc, model, config.model, owns_model=False)
        self._vocab = self.tokenizer.vocab
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = config.kv_cells
        cparams.n_batch = config.batch_tokens
        cparams.n_ubatch = config.batch_tokens
        cparams.n_seq_max = config.kv_sequences
        cparams.kv_unified = config.kv_unified  # False: one stream of n_ctx / n_seq per sequence
        cparams.flash_attn_type = 1 if config.flash_attn else 0  # enabled / disabled, not auto
        cparams.n_threads = config.n_threads
        cparams.n_threads_batch = config.n_threads
        cparams.no_perf = True
        ctx = lc.llama_init_from_model(model, cparams)
        if not ctx:
            lc.llama_model_free(model)
            raise ModelLoadError(f"llama.cpp could not create a context for {path}")
        self._ctx = ctx
        self._mem = lc.llama_get_memory(ctx)
        self._batch = lc.llama_batch_init(config.batch_tokens, 0, 1)
        self._batch_cap = config.batch_tokens
        self._samplers: dict[int, Any] = {}
        self._parked: dict[str, Any] = {}  # samplers of pre-empted sequences, by context key

        desc = ctypes.create_string_buffer(128)
        lc.llama_model_desc(model, desc, len(desc))
        self.model_name = config.model
        self.description = desc.value.decode(errors="replace")
        self.path = path
        self.slots = config.kv_sequences
        self.context_tokens = config.kv_cells
        self.max_sequence_tokens = min(
            config.max_sequence_tokens, lc.llama_model_n_ctx_train(model)
        )

    # -- tokenization (read-only use of the vocabulary) -----------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.tokenize(text)

    def tokenize_chat(self, messages: Sequence[Message]) -> list[int]:
        return self.tokenizer.tokenize_chat(messages)

    # -- the step ---------------------------------------------------------------------------
    def step(self, plan: StepPlan, store: ContextStore) -> list[Sampled]:
        lc, mark = self._lc, self._mark
        for save in plan.saves:
            mark(Phase.SAVE, save.slot)
            store.put(save.key, self.save_seq(save.slot))
            self._parked[save.key] = self._samplers.pop(save.slot, None)
            self._release(save.slot)
        for slot in plan.releases:
            mark(Phase.RELEASE, slot)
            self._release(slot)
        for key in plan.drops:
            mark(Phase.DROP, None)
            store.drop(key)
            self._free_sampler(self._parked.pop(key, None))
        for restore in plan.restores:
            mark(Phase.RESTORE, restore.slot)
            self.load_seq(restore.slot, store.take(restore.key))
            self._free_sampler(self._samplers.pop(restore.slot, None))
            self._samplers[restore.slot] = self._parked.pop(restore.key, None)
        for copy in plan.copies:
            # Whole-sequence copy, then trim: per-sequence streams only copy whole buffers.
            mark(Phase.COPY, copy.dst)
            lc.llama_memory_seq_cp(self._mem, copy.src, copy.dst, -1, -1)
            lc.llama_memory_seq_rm(self._mem, copy.dst, copy.n, -1)
        for slot, keep in plan.trims:
            mark(Phase.TRIM, slot)
            lc.llama_memory_seq_rm(self._mem, slot, keep, -1)
        for start in plan.starts:
            mark(Phase.START, start.slot)
            self._free_sampler(self._samplers.pop(start.slot, None))
            self._samplers[start.slot] = self._make_sampler(start)

        batch = self._batch
        n = 0
        outputs: list[tuple[int, int]] = []  # (slot, batch index whose logits we sample)
        for item in plan.items:
            if n + len(item.tokens) > self._batch_cap:
                raise CoreError(f"step plan of {plan.n_tokens} tokens exceeds the batch size")
            for j, token in enumerate(item.tokens):
                batch.token[n] = token
                batch.pos[n] = item.pos + j
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = item.slot
                batch.logits[n] = 0
                n += 1
            if item.sample:
                batch.logits[n - 1] = 1
                outputs.append((item.slot, n - 1))
        if n == 0:
            return []
        batch.n_tokens = n
        mark(Phase.DECODE, None)
        rc = lc.llama_decode(self._ctx, batch)
        if rc != 0:
            # 1: no KV slot for the batch; <0: error. The KV state of this batch is undefined,
            # so the core fails the requests in it and releases their sequences.
            raise CoreError(f"llama_decode failed with code {rc}")
        sampled = []
        for slot, index in outputs:
            mark(Phase.SAMPLE, slot)
            token = lc.llama_sampler_sample(self._samplers[slot], self._ctx, index)
            eog = lc.llama_vocab_is_eog(self._vocab, token)
            sampled.append(Sampled(slot, token, self.tokenizer.piece(token), eog))
        return sampled

    def _make_sampler(self, start: SeqStart) -> Any:
        lc = self._lc
        params = start.params
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        if params.json_output:
            grammar = lc.llama_sampler_init_grammar(
                self._vocab, json_grammar(params.json_schema).encode(), b"root"
            )
            if not grammar:
                lc.llama_sampler_free(chain)
                raise CoreError("llama.cpp rejected the JSON grammar")
            lc.llama_sampler_chain_add(chain, grammar)
        if params.greedy:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
        else:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(params.top_p, 1))
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(params.temperature))
            seed = _DEFAULT_SEED if params.seed is None else params.seed
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(seed))
        return chain

    # -- context switch ---------------------------------------------------------------------
    def save_seq(self, slot: int) -> bytes:
        """The KV state of one sequence, serialized (llama_state_seq_get_data)."""
        lc = self._lc
        size = lc.llama_state_seq_get_size(self._ctx, slot)
        buf = (ctypes.c_uint8 * size)()
        written = lc.llama_state_seq_get_data(self._ctx, buf, size, slot)
        if written != size:
            raise CoreError(f"llama.cpp saved {written} of {size} bytes of sequence {slot}")
        return bytes(buf)

    def load_seq(self, slot: int, data: bytes) -> None:
        """Load a saved sequence state into the empty ``slot`` (llama_state_seq_set_data)."""
        lc = self._lc
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if lc.llama_state_seq_set_data(self._ctx, buf, len(data), slot) == 0:
            raise CoreError(f"llama.cpp could not restore a context into slot {slot}")

    def _release(self, slot: int) -> None:
        self._lc.llama_memory_seq_rm(self._mem, slot, -1, -1)
        self._free_sampler(self._samplers.pop(slot, None))

    def _free_sampler(self, sampler: Any) -> None:
        if sampler is not None:
            self._lc.llama_sampler_free(sampler)

    def close(self) -> None:
        lc = self._lc
        for slot in list(self._samplers):
            self._release(slot)
        for sampler in self._parked.values():
            self._free_sampler(sampler)
        self._parked.clear()
        lc.llama_batch_free(self._batch)
        lc.llama_free(self._ctx)
        lc.llama_model_free(self._model)
