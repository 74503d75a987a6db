"""The web playground in real headless Chromium (Debian's /usr/bin/chromium and
chromedriver) against the real services: sign in, stream an answer, then
label tasks the LabelingService serves from other users' logged prompts
without typing a prompt: Likert and flags per output, a ranking with ties by
drag-and-drop and keyboard, a refusal for an incomplete ranking that writes
nothing, the submission, the next task, and the quality dashboard; the events
are read back from the broker."""

from __future__ import annotations

import re

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from services.playground.client import PlaygroundClient
from tests.integration.test_playground_api import LONG_ANSWER, read_events, wait_running

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WAIT_S = 60


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--window-size=1280,1500",
    ):
        options.add_argument(flag)
    # An explicit driver path: selenium-manager never downloads anything.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(driver, condition, message):
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(lambda d: condition(d), message)


def card(driver, letter):
    return driver.find_element(By.CSS_SELECTOR, f'.sample[aria-label="Sample {letter}"]')


def test_sign_in_prompt_rank_and_submit(playground_stack, browser, tmp_path):
    driver, stack = browser, playground_stack
    driver.get(stack.web.url)

    # --- sign in (a wrong token is refused in words first)
    driver.find_element(By.ID, "token").send_keys("wrong-token", Keys.ENTER)
    wait_for(driver, lambda d: d.find_element(By.ID, "signin-error").is_displayed(), "no sign-in error")
    assert "unknown bearer token" in driver.find_element(By.ID, "signin-error").text
    token = driver.find_element(By.ID, "token")
    token.clear()
    token.send_keys("tok-lab", Keys.ENTER)
    wait_for(driver, lambda d: d.find_element(By.ID, "workspace").is_displayed(), "sign-in did not open the workspace")
    assert driver.find_element(By.ID, "whoami-user").text == "lab1"

    # --- the Label tab on an empty queue says so and keeps asking; another user logs a prompt,
    # and its task (K=4 outputs, nothing to type) shows up without a click
    driver.find_element(By.ID, "tab-prompt").send_keys(Keys.ARROW_RIGHT)
    assert driver.switch_to.active_element.get_attribute("id") == "tab-label"
    wait_for(driver, lambda d: "No task is queued now" in d.find_element(By.ID, "task-status").text, "no empty queue")
    assert not driver.find_element(By.ID, "label-error").is_displayed()
    client = PlaygroundClient(stack.settings)
    try:
        client.log_prompt("tok-user", prompt="Name a colour.", mode="prompt", request_id="browser-colour")
    finally:
        client.close()
    wait_for(
        driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#unranked .sample")) == 4, "no task with 4 outputs"
    )
    assert (
        driver.find_elements(By.CSS_SELECTOR, "#panel-label textarea:not([hidden])") == []
        or not driver.find_element(By.ID, "demo-area").is_displayed()
    )  # a comparison: nothing to type
    task_prompt = driver.find_element(By.ID, "task-prompt").text
    assert task_prompt == "Name a colour."
    driver.find_element(By.ID, "tab-label").send_keys(Keys.ARROW_LEFT)  # back to prompting; the lease stays
    assert driver.switch_to.active_element.get_attribute("id") == "tab-prompt"

    # --- prompt: record every intermediate rendering of the answer to see it stream
    driver.execute_script("""
        window.renders = [];
        new MutationObserver((records) => {
          for (const r of records)
            if (r.target.matches && r.target.matches('.turn.assistant .text'))
              for (const n of r.addedNodes) window.renders.push(n.data);
        }).observe(document.getElementById('transcript'), {childList: true, subtree: true});
    """)
    prompt = driver.find_element(By.ID, "prompt")
    prompt.send_keys("Write a haiku about the sea.")
    prompt.send_keys(Keys.CONTROL, Keys.ENTER)  # keyboard send
    wait_for(
        driver, lambda d: d.find_element(By.ID, "prompt-status").text.startswith("Done"), "the answer never finished"
    )
    answer = driver.find_element(By.CSS_SELECTOR, ".turn.assistant .text").text
    renders = driver.execute_script("return window.renders")
    assert len(set(renders)) >= 2 and renders[-1].strip() == answer.strip(), renders
    assert driver.find_element(By.ID, "model-version").text == stack.policy.version
    assert stack.policy.version in driver.find_element(By.ID, "prompt-status").text

    # --- back on the Label tab: the leased task is still there, its lease counting down
    driver.find_element(By.ID, "tab-prompt").send_keys(Keys.ARROW_RIGHT)
    assert driver.find_element(By.ID, "task-prompt").text == task_prompt
    wait_for(driver, lambda d: re.match(r"Lease: 2\d:\d\d", d.find_element(By.ID, "lease").text), "no lease time shown")

    # Likert by keyboard on A, C, D, by the select on B, plus a flag on B
    card(driver, "A").send_keys("6")
    Select(card(driver, "B").find_element(By.CLASS_NAME, "likert")).select_by_value("3")
    card(driver, "B").find_element(By.CSS_SELECTOR, ".flags summary").click()
    card(driver, "B").find_element(By.CSS_SELECTOR, '.flag[value="LABEL_FLAG_HALLUCINATION"]').click()
    card(driver, "C").send_keys("2")
    card(driver, "D").send_keys("5")

    # --- an incomplete ranking is refused by the service, visibly, and writes nothing
    card(driver, "A").send_keys(Keys.ENTER)  # keyboard: A into the ranking
    driver.find_element(By.ID, "submit-labels").click()
    wait_for(
        driver, lambda d: d.find_element(By.ID, "label-error").is_displayed(), "no error for an incomplete ranking"
    )
    error = driver.find_element(By.ID, "label-error").text
    assert "labeling service: INVALID_ARGUMENT (HTTP 422): judgements[1].rank: is 0" in error
    assert error.endswith("(nothing was recorded)")
    assert read_events(stack.settings, "comparisons") == []

    # --- complete it: B by drag-and-drop below A, then C, D by keyboard; D moves above C, C ties with it
    a, b = card(driver, "A"), card(driver, "B")
    ActionChains(driver).click_and_hold(b).move_to_element_with_offset(
        a, 0, a.size["height"] // 2 - 4
    ).release().perform()
    wait_for(
        driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#ranking .sample")) == 2, "drag-and-drop did not rank B"
    )
    for letter in "CD":
        card(driver, letter).send_keys(Keys.ENTER)
    card(driver, "D").send_keys(Keys.ALT, Keys.ARROW_UP)  # A, B, D, C
    card(driver, "C").send_keys("t")  # C ties with D above it
    order = [c.get_attribute("aria-label")[-1] for c in driver.find_elements(By.CSS_SELECTOR, "#ranking .sample")]
    assert order == ["A", "B", "D", "C"]
    expected_ranks = {"A": 1, "B": 2, "D": 3, "C": 3}
    assert {
        c.get_attribute("aria-label")[-1]: int(c.get_attribute("data-rank"))
        for c in driver.find_elements(By.CSS_SELECTOR, "#ranking .sample")
    } == expected_ranks

    # the whole task in one picture: grow the window to the document's height
    driver.set_window_size(1280, driver.execute_script("return document.documentElement.scrollHeight") + 140)
    screenshot = tmp_path / "playground.png"
    driver.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000
    driver.find_element(By.ID, "submit-labels").click()
    wait_for(driver, lambda d: d.find_element(By.ID, "label-result").is_displayed(), "no confirmation")
    assert not driver.find_element(By.ID, "label-error").is_displayed()
    [shown_id] = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#label-result .event-id")]
    assert driver.switch_to.active_element.get_attribute("id") == "next-task"  # keyboard: Enter for the next one

    # --- what the broker holds: the server's versions, per-output Likert and flags, ranks with the tie
    [comparison] = read_events(stack.settings, "comparisons")
    assert comparison.event_id == shown_id and comparison.labeler_id == "lab1" and comparison.task_id
    assert comparison.prompt_text == task_prompt
    assert [r.rank for r in comparison.responses] == [expected_ranks[letter] for letter in "ABCD"]
    assert [(r.likert, list(r.flags)) for r in comparison.responses] == [(6, []), (3, [2]), (2, []), (5, [])]
    assert {r.policy_version for r in comparison.responses} == {stack.policy.version}
    logged = {p.text: p.user_id for p in read_events(stack.settings, "prompts")}
    assert logged[comparison.prompt_text] in ("u1", "lab1")  # a logged prompt, not typed on this tab

    # --- the queue serves the next prompt; then the quality dashboard
    driver.switch_to.active_element.send_keys(Keys.ENTER)
    wait_for(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#unranked .sample")) == 4, "no next task")
    assert driver.find_element(By.ID, "task-prompt").text != task_prompt
    driver.find_element(By.ID, "tab-quality").click()
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#versions-table tbody tr"), "no quality figures")
    version_row = driver.find_element(By.CSS_SELECTOR, "#versions-table tbody tr").text
    assert stack.policy.version in version_row and "hallucination 25.0%" in version_row
    assert "lab1" in driver.find_element(By.ID, "labelers-table").text


def open_generation_settings(driver) -> bool:
    """Click the prompt panel's "Generation settings" until its fields show: a click that lands
    while the signed-in workspace is still being laid out can leave the section closed."""
    section = driver.find_element(By.CSS_SELECTOR, "#panel-prompt details.settings")
    if section.get_attribute("open") is None:
        section.find_element(By.TAG_NAME, "summary").click()
    return driver.find_element(By.ID, "max-tokens").is_displayed()


def test_stop_ends_the_answer_and_frees_the_policy(playground_stack, browser):
    driver, stack = browser, playground_stack
    driver.get(stack.web.url.rstrip("/") + "/no-such-page")  # same origin, none of the app's code running:
    driver.execute_script("sessionStorage.clear()")  # signed out, whatever ran before
    driver.get(stack.web.url)
    driver.find_element(By.ID, "token").send_keys("tok-lab", Keys.ENTER)
    wait_for(driver, lambda d: d.find_element(By.ID, "workspace").is_displayed(), "sign-in did not open the workspace")
    wait_for(driver, open_generation_settings, "the generation settings did not open")
    driver.find_element(By.ID, "max-tokens").send_keys(str(LONG_ANSWER))
    driver.find_element(By.ID, "temperature").send_keys("0")  # greedy: the tiny model runs to the limit
    driver.find_element(By.ID, "prompt").send_keys("Count to a thousand.", Keys.CONTROL, Keys.ENTER)
    wait_for(driver, lambda d: d.find_element(By.CSS_SELECTOR, ".turn.assistant .text").text, "no token arrived")
    assert wait_running(stack, 1) == 1

    driver.find_element(By.ID, "stop").click()
    wait_for(driver, lambda d: d.find_element(By.ID, "prompt-status").text == "Stopped.", "Stop did not end the answer")
    assert wait_running(stack, 0) == 0  # the policy's slot is free again
    assert driver.find_element(By.CSS_SELECTOR, ".turn.assistant .text").text  # the partial answer stays
    assert driver.find_element(By.ID, "send").is_enabled() and not driver.find_element(By.ID, "stop").is_enabled()
