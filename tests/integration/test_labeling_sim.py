"""Simulated noisy labelers through the real services (policy on the tiny model,
feedback, broker, LabelingService): every task goes to all three of them, and the
agreement the service measures lands near InstructGPT's ~73%."""

from __future__ import annotations

import random

import grpc
from prometheus_client import REGISTRY
from rlhf.v1 import labeling_pb2_grpc

from services.labeling import server as labeling_server
from services.sim.labelers import run_labelers
from services.sim.tasks import sample_task
from services.sim.users import SimUser
from tests.integration.test_labeling_service import labeling_stack, log_prompts, wait_queued  # noqa: F401  (module fixture)

TASKS = 32  # each labeled by all three labelers: 32 tasks x 3 labeler pairs x C(4,2) = 576 response pairs
TEAM = [SimUser(u, t) for u, t in (("la", "tok-la"), ("lb", "tok-lb"), ("lc", "tok-lc"))]


def test_noisy_labelers_agree_near_the_papers_rate(labeling_stack, tmp_path):  # noqa: F811 - the fixture imported above
    rng = random.Random(7)
    prompts = {"tok-u1": [], "tok-u2": []}
    for i in range(TASKS):
        prompts["tok-u1" if i % 2 else "tok-u2"].append(f"({i}) {sample_task(rng).render()}")
    log_prompts(labeling_stack.settings, prompts)
    settings = labeling_stack.settings.with_overrides(
        home=tmp_path,
        labeling_demonstration_share=0.0,
        labeling_overlap_share=1.0,
        labeling_overlap_labelers=len(TEAM),
        labeling_max_new_tokens=40,
        dataset_max_prompts_per_user=10_000,
    )
    handle = labeling_server.start(settings, port=0)
    channel = grpc.insecure_channel(f"127.0.0.1:{handle.port}")
    try:
        wait_queued(labeling_pb2_grpc.LabelingServiceStub(channel), TASKS)
        run = run_labelers(channel, TEAM, len(TEAM) * TASKS, kind="comparison", wait_s=5, progress=False)
        assert run.comparisons == len(TEAM) * TASKS and run.duplicates == 0
        stats = handle.servicer.stats()
        assert stats.overlap_tasks >= TASKS - 2 and stats.compared_pairs >= 3 * 6 * (TASKS - 2)
        assert 0.65 <= stats.pairwise_agreement <= 0.80, stats.pairwise_agreement
        assert 0 < stats.kendall_tau_b < 1
        assert {labeler.labeler_id for labeler in stats.labelers} == {u.user_id for u in TEAM}
        assert REGISTRY.get_sample_value("rlhf_labeling_pairwise_agreement") == stats.pairwise_agreement
        print(f"measured agreement {stats.pairwise_agreement:.3f} over {stats.compared_pairs} pairs")
    finally:
        channel.close()
        handle.stop()
