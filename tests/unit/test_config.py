import subprocess
import sys

import pytest

from services.common.config import ConfigError, load_settings, markdown_table


def test_defaults_match_documented_ports():
    s = load_settings({})
    assert (s.kafka_bootstrap, s.policy_port, s.reward_port, s.feedback_port, s.http_port, s.playground_port) == (
        "127.0.0.1:9092",
        50051,
        50052,
        50053,
        8080,
        8000,
    )
    assert s.checkpoint_dir == s.home / "checkpoints"


@pytest.mark.parametrize(
    "env, fragment",
    [
        ({"RLHF_POLICY_PORT": "abc"}, "RLHF_POLICY_PORT='abc' is not an integer"),
        ({"RLHF_POLICY_PORT": "70000"}, "RLHF_POLICY_PORT=70000 is above the maximum 65535"),
        ({"RLHF_MODEL": "huge"}, "RLHF_MODEL='huge' is not one of base, tiny"),
        ({"RLHF_KAFKA_BOOTSTRAP": "nohostport"}, "RLHF_KAFKA_BOOTSTRAP"),
        ({"RLHF_MAX_BATCH": "0"}, "RLHF_MAX_BATCH=0 is below the minimum 1"),
        ({"RLHF_POLICY_PROT": "1"}, "unknown setting RLHF_POLICY_PROT"),
        ({"RLHF_DEFAULT_MAX_NEW_TOKENS": "900"}, "exceeds RLHF_MAX_NEW_TOKENS_LIMIT"),
    ],
)
def test_bad_value_names_the_variable(env, fragment):
    with pytest.raises(ConfigError) as err:
        load_settings(env)
    assert fragment in str(err.value)


def test_bad_value_stops_a_service_at_start_with_a_message():
    proc = subprocess.run(
        [sys.executable, "-m", "services.common.config"],
        env={"RLHF_REWARD_PORT": "-1", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "configuration error: RLHF_REWARD_PORT=-1 is below the minimum 0" in proc.stderr


def test_markdown_table_lists_every_variable():
    table = markdown_table()
    for name in ("RLHF_KAFKA_BOOTSTRAP", "RLHF_MAX_QUEUE", "RLHF_TGI_URL"):
        assert f"`{name}`" in table


def test_to_env_round_trips():
    from services.common.config import to_env

    s = load_settings(
        {"RLHF_MODEL": "tiny", "RLHF_TRAINER_OVERRIDES": '{"ppo": {"steps": 2}}', "RLHF_POLICY_PORT": "123"}
    )
    assert load_settings(to_env(s)) == s


def test_readme_config_table_is_generated_from_the_settings():
    from pathlib import Path

    from services.common.config import readme_with_table

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert readme == readme_with_table(readme), (
        "README's config table is stale: python -m services.common.config --readme README.md"
    )


def test_readme_table_generation_keeps_the_text_around_it():
    from services.common.config import README_END, README_START, readme_with_table

    first = readme_with_table(f"intro\n{README_START}\n## Deployment\nkeep me\n")
    assert first.startswith("intro\n") and first.endswith("\n## Deployment\nkeep me\n")
    assert README_END in first and "`RLHF_KAFKA_BOOTSTRAP`" in first
    again = readme_with_table(first)
    assert again == first
