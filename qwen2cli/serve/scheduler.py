"""One model serving several requests: a worker thread owns the model and a few cache slots, admits waiting
requests into free slots (reusing the longest cached prompt prefix), and steps every active request one token
at a time, so answers stream side by side; each request's tokens are exactly those it would get alone."""

from __future__ import annotations

import functools
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..generate import PREFILL_CHUNK, Engine, prefill
from ..kv_cache import KVCache
from ..sampling import SamplingParams, pick_token
from .batch_decode import can_batch, decode_step
from .constrain import Constraint


@dataclass(frozen=True)
class Token:
    """A generated token; with logprobs asked for, its log-probability and the top alternatives' (id, logprob)."""

    token_id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Finished:
    """The end of a request: finish_reason "stop", "length" or "cancelled", and its token counts."""

    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    message: str


Event = Token | Finished | Failed


@dataclass
class Job:
    """A request to continue `prompt_ids`; `emit` is called from the worker thread with each Event."""

    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    constraint: Constraint | None = None
    banned_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # None: none reported; else each token's and this many alternatives'
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Slot:
    """A KV cache and the token ids whose keys and values it holds."""

    cache: KVCache
    fed_ids: list[int] = field(default_factory=list)
    last_used: float = 0.0
    busy: bool = False


@dataclass
class Active:
    job: Job
    slot: Slot
    unread: list[int]  # prompt tokens still to read into the slot's cache, a chunk per turn of the worker
    logits: torch.Tensor | None  # the next token's logits (vocab,), once the prompt is read
    seen: torch.Tensor  # (vocab,) bool: prompt and answer tokens, for the repetition penalty
    counts: torch.Tensor  # (vocab,) float: answer tokens, for frequency and presence penalties
    generator: torch.Generator
    cached_tokens: int
    completion_tokens: int = 0


def common_prefix(a: list[int], b: list[int]) -> int:
    limit = min(len(a), len(b))
    index = 0
    while index < limit and a[index] == b[index]:
        index += 1
    return index


class Scheduler:
    """Runs Jobs on `engine` in a worker thread with `slots` caches of the engine's context each."""

    def __init__(self, engine: Engine, *, slots: int) -> None:
        self.engine = engine
        self.slots = [Slot(cache=engine.new_cache(engine.ctx)) for _ in range(slots)]
        # one slot: the model's own single-token path (native kernels where they apply); several: batched steps
        self._batched = slots > 1 and can_batch(engine.loaded.model)
        self._waiting: deque[Job] = deque()
        self._active: list[Active] = []
        self._wake = threading.Condition()
        self._stopping = False
        self.finished: Counter[str] = Counter()  # requests ended so far, by finish reason
        self.widest_step = 0  # the most requests one decode step has advanced together
        self._thread = threading.Thread(target=self._run, name="qwen2-scheduler", daemon=True)
        self._here = False  # run_here: the worker is the caller's thread

    def start(self) -> None:
        """Run the worker in a thread of its own (nothing, after `run_here`'s promise)."""
        if not self._here:
            self._thread.start()

    def will_run_here(self) -> None:
        """Promise that `run_here` will run the worker: `start()` then does nothing."""
        self._here = True

    def run_here(self) -> None:
        """Be the worker in the calling thread until `stop()` (or an exception: KeyboardInterrupt). The server runs
        the model in the thread that loaded it: OpenMP keeps a pool of threads for each thread that starts parallel
        work, and with two pools on the same cores libgomp stops spinning between parallel regions, so decoding in
        a second thread ran about 1.6x slower than in the loading one."""
        self.will_run_here()
        self._run()

    def stop(self) -> None:
        """Finish nothing more: active and waiting requests end as cancelled; the worker exits."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        with self._wake:
            if not self._stopping:
                self._waiting.append(job)
                self._wake.notify()
                return
        job.emit(Finished("cancelled", len(job.prompt_ids), 0, 0))  # the worker has stopped, or is stopping

    def load(self) -> dict[str, int]:
        """Requests being answered and waiting now, and those ended so far by finish reason."""
        return {
            "active": len(self._active),
            "waiting": len(self._waiting),
            "widest_step": self.widest_step,
            **self.finished,
        }

    def wake(self) -> None:
        """Look at the requests again (one was cancelled while the worker waited)."""
        with self._wake:
            self._wake.notify()

    # -- the worker thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._wake:
                        while not self._stopping and not self._active and not self._waiting:
                            self._wake.wait(timeout=0.5)  # a timeout: a KeyboardInterrupt is taken between waits
                        if self._stopping:
                            break
                        admitted = self._take_admissible()
                    for job, slot in admitted:
                        self._guarded(job, functools.partial(self._admit, job, slot), slot)
                    reading = next((active for active in self._active if active.unread), None)
                    if reading is not None:  # one chunk of one prompt a turn: the others' answers keep flowing
                        self._guarded(reading.job, functools.partial(self._read, reading), reading.slot, reading)
                    pending = []
                    for active in list(self._active):
                        if active.logits is None:
                            continue
                        token = self._guarded(active.job, functools.partial(self._step, active), active.slot, active)
                        if token is not None:
                            pending.append((active, token))
                    if pending:
                        self._forward(pending)
        finally:
            with self._wake:
                self._stopping = True  # (when interrupted) submit() from now on ends its job at once
            for active in list(self._active):
                self._end(active, "cancelled")
            while self._waiting:
                job = self._waiting.popleft()
                job.emit(Finished("cancelled", len(job.prompt_ids), 0, 0))

    def _guarded(
        self, job: Job, work: Callable[[], int | None], slot: Slot, active: Active | None = None
    ) -> int | None:
        """Run one piece of a job's work; a failure ends that job (its slot forgotten), never the worker."""
        try:
            return work()
        except Exception as exc:  # noqa: BLE001 - reported to the one request it concerns
            self._fail(job, slot, active, exc)
            return None

    def _fail(self, job: Job, slot: Slot, active: Active | None, exc: Exception) -> None:
        slot.fed_ids, slot.busy = [], False
        slot.cache.reset()
        if active is not None and active in self._active:
            self._active.remove(active)
        job.emit(Failed(f"{type(exc).__name__}: {exc}"))

    def _take_admissible(self) -> list[tuple[Job, Slot]]:
        """Waiting jobs paired with free slots, each slot the one holding the longest prefix of its prompt."""
        taken = []
        while self._waiting:
            job = self._waiting[0]
            if job.cancelled.is_set():
                self._waiting.popleft()
                self.finished["cancelled"] += 1
                job.emit(Finished("cancelled", len(job.prompt_ids), 0, 0))
                continue
            free = [slot for slot in self.slots if not slot.busy]
            if not free:
                break
            self._waiting.popleft()
            slot = max(free, key=lambda s: (common_prefix(s.fed_ids, job.prompt_ids), -s.last_used))
            slot.busy = True
            taken.append((job, slot))
        return taken

    def _admit(self, job: Job, slot: Slot) -> None:
        """Make the job active in its slot, keeping the part of the prompt the slot holds; the rest is read by
        `_read`, a chunk per turn."""
        engine, prompt = self.engine, job.prompt_ids
        kept = min(common_prefix(slot.fed_ids, prompt), slot.cache.pos, len(prompt) - 1)
        slot.cache.trim(kept)
        slot.fed_ids = prompt[:kept]
        device = engine.loaded.device
        vocab = engine.config.vocab_size
        seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        seen[torch.tensor(prompt, device=device)] = True
        generator = torch.Generator(device=device)
        if job.params.seed is not None:
            generator.manual_seed(job.params.seed)
        else:
            generator.seed()
        counts = torch.zeros(vocab, dtype=torch.float32, device=device)
        self._active.append(Active(job, slot, prompt[kept:], None, seen, counts, generator, cached_tokens=kept))

    def _read(self, active: Active) -> None:
        """Read the next chunk of the job's prompt, in the chunks `prefill` reads a whole prompt in (so a prompt's
        numbers do not depend on what else the server is doing)."""
        if active.job.cancelled.is_set():
            self._end(active, "cancelled")
            return
        chunk, active.unread = active.unread[:PREFILL_CHUNK], active.unread[PREFILL_CHUNK:]
        logits = prefill(self.engine, active.slot.cache, chunk)
        active.slot.fed_ids += chunk
        if not active.unread:
            active.logits = logits

    def _choose(self, active: Active) -> Token:
        """The next token, with the model's log-probabilities (before penalties and grammar) when asked for."""
        job, logits = active.job, active.logits
        assert logits is not None, "only a job whose prompt is read chooses tokens"
        logits[self.engine.sampleable_vocab :] = float("-inf")
        model_logprobs = torch.log_softmax(logits, dim=-1) if job.logprobs is not None else None
        if job.banned_ids:
            logits[list(job.banned_ids)] = float("-inf")
        if job.frequency_penalty or job.presence_penalty:
            logits -= job.frequency_penalty * active.counts + job.presence_penalty * (active.counts > 0).float()
        if job.constraint is not None:
            logits.masked_fill_(~job.constraint.allowed().to(logits.device), float("-inf"))
        token = pick_token(logits, job.params, seen=active.seen, generator=active.generator)
        if model_logprobs is None or job.logprobs is None:
            return Token(token)
        top = torch.topk(model_logprobs, job.logprobs) if job.logprobs else None
        alternatives = tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else ()
        return Token(token, float(model_logprobs[token]), alternatives)

    def _step(self, active: Active) -> int | None:
        """One token for one active job: choose and report it; return it when it must run through the model."""
        job, slot = active.job, active.slot
        if job.cancelled.is_set():
            self._end(active, "cancelled")
            return None
        chosen = self._choose(active)
        token = chosen.token_id
        if job.constraint is not None:
            job.constraint.advance(token)
        active.completion_tokens += 1
        if token in self.engine.stop_ids:
            self._end(active, "stop")
            return None
        job.emit(chosen)
        if active.completion_tokens >= job.params.max_tokens or slot.cache.pos >= slot.cache.max_len:
            self._end(active, "length")
            return None
        active.seen[token] = True
        active.counts[token] += 1
        return token

    def _forward(self, pending: list[tuple[Active, int]]) -> None:
        """Run each pending token through the model in its job's cache: one batched step where the model allows."""
        model = self.engine.loaded.model
        self.widest_step = max(self.widest_step, len(pending))
        try:
            if self._batched:
                tokens, caches = [token for _, token in pending], [active.slot.cache for active, _ in pending]
                logits = decode_step(model, tokens, caches, rows=len(self.slots))
                rows = list(logits)
            else:
                device = self.engine.loaded.device
                rows = [
                    model(torch.tensor([[token]], device=device), active.slot.cache, active.slot.cache.pos,
                          last_only=True)[0, -1].float()
                    for active, token in pending
                ]  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - reported to the requests in this step
            for active, _ in pending:
                self._fail(active.job, active.slot, active, exc)
            return
        for (active, token), row in zip(pending, rows, strict=True):
            active.slot.fed_ids.append(token)
            active.logits = row

    def _end(self, active: Active, reason: str) -> None:
        self._active.remove(active)
        active.slot.busy = False
        active.slot.last_used = time.monotonic()
        job = active.job
        self.finished[reason] += 1
        job.emit(Finished(reason, len(job.prompt_ids), active.cached_tokens, active.completion_tokens))
