"""The TGI backend: when RLHF_TGI_URL is set, the policy service generates
through a Text Generation Inference server with the unmodified
`text_generation` client instead of a local model.

The service still renders chat templates and checks prompt length with the
local tokenizer, so both backends accept and refuse the same requests. The
serving version is the upstream's `model_id` from its /info: our own
TGI-compatible endpoint reports the checkpoint version there, and a real TGI
started with `--model-id /data/checkpoints/<version>` reports that folder,
whose name is the version (the controller rolls TGI to each promoted policy:
services/controller/tgi_rollout.py).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from services.common.config import Settings
from services.common.errors import Status, StatusError
from services.common.logs import get_logger, log_fields
from services.common.models import ensure_tokenizer, load_tokenizer
from services.policy.params import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, SampleOut, TokenOut
from services.policy.request import Finished, GenRequest, SampleDone, Token

log = get_logger(__name__)

_FINISH = {"length": FINISH_LENGTH, "eos_token": FINISH_EOS, "stop_sequence": FINISH_STOP}
INFO_TTL_S = 2.0


def _client_error(err: Exception) -> StatusError:
    from text_generation import errors

    if isinstance(err, (errors.ValidationError, errors.BadRequestError)):
        return StatusError(Status.INVALID_ARGUMENT, f"TGI refused the request: {err}")
    if isinstance(err, (errors.OverloadedError, errors.RateLimitExceededError)):
        return StatusError(Status.RESOURCE_EXHAUSTED, f"TGI is overloaded: {err}")
    if isinstance(err, errors.GenerationError):
        return StatusError(Status.INTERNAL, f"TGI generation failed: {err}")
    return StatusError(Status.UNAVAILABLE, f"TGI at the configured RLHF_TGI_URL is unavailable: {err}")


def version_of(model_id: str) -> str:
    """The checkpoint version TGI serves: a folder path's last part (checkpoint
    folders are named by their version), else the model id as it is."""
    return Path(model_id.rstrip("/")).name if model_id.startswith("/") else model_id


class TgiBackend:
    name = "tgi"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.url = settings.tgi_url.rstrip("/")
        # RLHF_TGI_TOKEN, for an upstream that checks bearer tokens (such as another policy service).
        self.headers = {"Authorization": f"Bearer {settings.tgi_token}"} if settings.tgi_token else None
        self.tokenizer = load_tokenizer(ensure_tokenizer(settings.model_cache))
        # At most RLHF_MAX_BATCH requests upstream at once; RLHF_MAX_QUEUE more may wait.
        self._pool = ThreadPoolExecutor(max_workers=settings.max_batch, thread_name_prefix="tgi-call")
        self._lock = threading.Lock()
        self._pending = 0
        self._info: dict = {}
        self._info_at = 0.0

    def start(self) -> None:
        info = self.info()
        log_fields(log, logging.INFO, "generating through TGI", url=self.url, model_id=info.get("model_id"))

    def stop(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- upstream facts -----------------------------------------------------
    def info(self) -> dict:
        now = time.monotonic()
        if now - self._info_at > INFO_TTL_S:
            try:
                reply = httpx.get(f"{self.url}/info", headers=self.headers, timeout=5.0)
                reply.raise_for_status()
                self._info, self._info_at = reply.json(), now
            except (httpx.HTTPError, ValueError) as err:
                if not self._info:
                    raise StatusError(
                        Status.UNAVAILABLE, f"TGI at RLHF_TGI_URL={self.url} is unavailable: {err}"
                    ) from None
        return self._info

    @property
    def version(self) -> str:
        return version_of(str(self.info().get("model_id", "unknown")))

    def model_info(self) -> dict:
        info = self.info()
        return dict(
            version=self.version, kind="", manifest_json="", pinned_version="", available_versions=[], backend=self.name
        ) | ({"kind": info["kind"]} if "kind" in info else {})

    def pin(self, version: str):
        raise StatusError(
            Status.FAILED_PRECONDITION,
            "this policy service generates through TGI (RLHF_TGI_URL); pin versions on the TGI server",
        )

    # --- generation ---------------------------------------------------------
    def submit(self, req: GenRequest) -> None:
        with self._lock:
            if self._pending >= self.settings.max_batch + self.settings.max_queue:
                raise StatusError(
                    Status.RESOURCE_EXHAUSTED,
                    f"the request queue is full ({self.settings.max_queue} waiting, RLHF_MAX_QUEUE); retry later",
                )
            self._pending += 1
        self._pool.submit(self._run, req)

    def _run(self, req: GenRequest) -> None:
        try:
            self._generate(req)
        except StatusError as err:
            req.fail(err.status, err.message)
        except Exception as err:  # noqa: BLE001 - any client failure is mapped to a status for this request alone
            mapped = _client_error(err)
            req.fail(mapped.status, mapped.message)
        finally:
            with self._lock:
                self._pending -= 1

    def _generate(self, req: GenRequest) -> None:
        asyncio.run(self._generate_samples(req))

    async def _generate_samples(self, req: GenRequest) -> None:
        """The K samples go upstream as K concurrent requests, which TGI batches
        together; the first failure (or a cancel) stops the others."""
        from text_generation import AsyncClient

        version = self.version
        timeout = 600 if req.deadline is None else max(1, int(req.deadline - time.monotonic()) + 1)
        client = AsyncClient(self.url, headers=self.headers, timeout=timeout)
        tasks = [
            asyncio.create_task(self._sample(client, req, index, seed, version))
            for index, seed in enumerate(req.params.sample_seeds())
        ]
        if req.params.prompt_logprobs:  # TGI scores the prompt only in a non-streaming reply
            tasks.append(asyncio.create_task(self._prefill(client, req)))
        try:
            results = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()  # closes their HTTP streams, so TGI frees those slots too
            await asyncio.gather(*tasks, return_exceptions=True)
        prefill = results.pop() if req.params.prompt_logprobs else []
        req.emit(Finished(version, len(req.prompt_ids), sum(results), prefill))

    @staticmethod
    async def _prefill(client, req: GenRequest) -> list[TokenOut]:
        reply = await client.generate(req.prompt_text, max_new_tokens=1, decoder_input_details=True)
        return [TokenOut(t.id, t.text, t.logprob, False) for t in reply.details.prefill]

    async def _sample(self, client, req: GenRequest, index: int, seed: int, version: str) -> int:
        """Stream one sample from TGI; return its generated token count."""
        p = req.params
        stream = client.generate_stream(
            req.prompt_text,
            do_sample=not p.greedy,
            max_new_tokens=p.max_new_tokens,
            temperature=None if p.greedy or p.temperature == 1.0 else p.temperature,
            top_p=p.top_p if p.top_p < 1.0 else None,
            top_k=p.top_k or None,
            repetition_penalty=p.repetition_penalty if p.repetition_penalty != 1.0 else None,
            stop_sequences=list(p.stop) or None,
            seed=None if p.greedy else seed,
        )
        tokens: list[TokenOut] = []
        try:
            async for reply in stream:
                if req.cancelled:
                    raise StatusError(Status.CANCELLED, "cancelled by the client")
                if req.expired():
                    raise StatusError(Status.DEADLINE_EXCEEDED, "deadline exceeded while generating")
                tok = TokenOut(reply.token.id, reply.token.text, reply.token.logprob, reply.token.special)
                tokens.append(tok)
                final = None
                if reply.details is not None:
                    final = SampleOut(
                        index=index,
                        text=reply.generated_text or "",
                        finish_reason=_FINISH.get(reply.details.finish_reason.value, FINISH_LENGTH),
                        generated_tokens=reply.details.generated_tokens,
                        seed=None if p.greedy else seed,
                        tokens=tokens if p.return_logprobs else [],
                    )
                if req.stream:
                    req.emit(Token(index, tok, version, final))
                if final is not None:
                    req.emit(SampleDone(final, version))
                    return final.generated_tokens
        finally:
            await stream.aclose()
        raise StatusError(Status.UNAVAILABLE, f"TGI ended sample {index}'s stream without its final details")
