"""The rater web UI in a real browser: Debian's headless Chromium driven by selenium (never a downloaded
browser), against the real preference service and broker.

Skips only when no Chromium/chromedriver is installed (`make env` installs them where apt is allowed).
Screenshots go to $FLYWHEEL_SCREENSHOTS_DIR when set (that is how docs/images/raters-*.png are made).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import uuid
from pathlib import Path

import pytest
from grpc import aio
from test_preference_service import auth, publish_rollouts, start_service, wait_known
from waiting import wait_until_async

from flywheel.preference.app import build_service
from flywheel.preference.auth import TokenStore
from flywheel.preference.export import read_pairs
from flywheel.preference.settings import PreferenceSettings
from flywheel.v1 import common_pb2, preference_pb2, preference_pb2_grpc

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
XSS = ["<script>window.__xss = 1</script>", '<img src=x onerror="window.__xss = 2">',
       "[click me](javascript:window.__xss=3)", "**bold** and `code`\n\n```\n<b>not bold</b>\n```"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def browser(tmp_path):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("no browser: install Debian's chromium and chromium-driver (make env does where apt works)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def shot(driver, name: str) -> None:
    target = os.environ.get("FLYWHEEL_SCREENSHOTS_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(target) / f"raters-{name}.png"))


def groups_for(unique: str, version: str, n_prompts: int, texts=None) -> list[list[common_pb2.Rollout]]:
    texts = texts or ["A **clear** answer with `code`.", "An okay answer.", "A poor answer.", "Nonsense."]
    out = []
    for i in range(n_prompts):
        pid = f"ui{i}-{unique}"
        out.append([common_pb2.Rollout(rollout_id=f"{pid}-{version}-r{j}", prompt_id=pid, raw_prompt=f"Question {i}?",
                                       response_text=t, policy_version=version, candidate_index=j)
                    for j, t in enumerate(texts)])
    return out


async def poll(driver, script_or_fn, what: str, timeout_s: float = 20.0):
    """Wait (without blocking the service's event loop) for a browser-side condition."""
    async def check():
        return await asyncio.to_thread(script_or_fn) if callable(script_or_fn) else \
            await asyncio.to_thread(driver.execute_script, script_or_fn)
    return await wait_until_async(check, timeout_s=timeout_s, interval_s=0.1, what=what)


def text_of(driver, element_id: str) -> str:
    return driver.execute_script(f"return document.getElementById('{element_id}').textContent")


async def sign_in(driver, base: str, token: str) -> None:
    await asyncio.to_thread(driver.get, base + "/")
    await poll(driver, "return !document.getElementById('view-login').hidden", "the sign-in page")
    await asyncio.to_thread(lambda: driver.find_element("id", "token").send_keys(token + "\n"))


async def rank_with_keyboard(driver, ranks: list[int]) -> str:
    """Lease the next task, type the ranks into the focused cards, submit with Enter; returns the prompt id."""
    await poll(driver, "return document.querySelectorAll('#candidates .card').length > 0 && "
                       "!document.getElementById('task').hidden", "a task on screen")
    prompt_id = driver.execute_script("return state.task.prompt_id")
    keys = "".join(str(r) for r in ranks)
    from selenium.webdriver.common.action_chains import ActionChains

    await asyncio.to_thread(lambda: ActionChains(driver).send_keys(keys).send_keys("\n").perform())
    await poll(driver, f"return !state.task || state.task.prompt_id !== '{prompt_id}'", "the ranking submitted")
    return prompt_id


@pytest.fixture
async def ui_service(kafka_bootstrap, settings_factory):
    started = []

    async def make(**overrides):
        base = dict(kafka_bootstrap_servers=kafka_bootstrap, preference_refresh_interval_s=3600.0,
                    preference_task_refresh_s=0.1, preference_task_settle_s=0.0, preference_task_random_share=0.0,
                    preference_task_gold_rate=0.0,
                    preference_ui_port=free_port())
        base.update(overrides)
        service, target, tokens = await start_service(settings_factory(PreferenceSettings, **base),
                                                      raters=("alice", "bob"))
        started.append(service)
        return service, target, tokens, f"http://127.0.0.1:{service.ui.port}"

    yield make
    for service in started:
        await service.runtime.stop(grace=0)


async def publish(service, bootstrap, groups) -> None:
    flat = [r for g in groups for r in g]
    publish_rollouts(bootstrap, flat)
    await wait_known(service, [r.rollout_id for r in flat])
    await wait_until_async(lambda: all((g[0].prompt_id, g[0].policy_version) in service.board._groups
                                       for g in groups), what="tasks in the pool")


async def test_rater_ranks_writes_and_is_protected(browser, ui_service, kafka_bootstrap, unique, tmp_path):
    service, target, tokens, base = await ui_service(preference_task_overlap=2)
    version = f"v-{unique}"
    [demo_group] = groups_for("d" + unique, f"d-{unique}", 1)  # older: leased after the four below
    await publish(service, kafka_bootstrap, [demo_group])
    groups = groups_for(unique, version, 3)
    evil = groups_for("x" + unique, version, 1, texts=XSS)[0]
    for r in evil:
        r.raw_prompt = "<script>window.__xss = 4</script> Which is best?"
    await publish(service, kafka_bootstrap, groups + [evil])
    driver = browser

    # bad tokens are refused in plain words
    await sign_in(driver, base, "fwp_not-a-token")
    await poll(driver, lambda: "not valid" in text_of(driver, "error"), "the bad-token message")
    shot(driver, "sign-in")
    await asyncio.to_thread(driver.find_element("id", "token").clear)
    await asyncio.to_thread(lambda: driver.find_element("id", "token").send_keys(tokens["alice"] + "\n"))
    await poll(driver, "return !document.getElementById('view-task').hidden", "the task page")
    cookie = driver.get_cookie("fw_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert driver.execute_script("return document.cookie") == ""  # invisible to scripts

    # the XSS group is this test's newest too: lease until it is on screen, rank everything with the keyboard
    ranked = []
    await asyncio.to_thread(driver.find_element("id", "next").click)
    for _ in range(4):
        await poll(driver, "return !!state.task", "a task")
        if driver.execute_script("return state.task.prompt_id") == evil[0].prompt_id:
            assert driver.execute_script("return window.__xss === undefined")
            assert not driver.find_elements("css selector", "#candidates img, #candidates script, #prompt script, "
                                                              "#candidates a, #prompt a")
            page_text = text_of(driver, "candidates")
            assert "<script>window.__xss = 1</script>" in page_text and 'onerror="window.__xss = 2"' in page_text
            assert "<b>not bold</b>" in driver.execute_script(
                "return Array.from(document.querySelectorAll('#candidates pre code')).map(e => e.textContent).join()")
            assert "<script>" in text_of(driver, "prompt")
            shot(driver, "xss-inert")
        else:
            shot(driver, "task-rank")
        ranked.append(await rank_with_keyboard(driver, [2, 1, 3, 3]))  # ties by typing the same number
    assert driver.execute_script("return window.__xss === undefined")
    assert set(ranked) == {g[0].prompt_id for g in groups} | {evil[0].prompt_id}

    # the page leased the next task by itself; write a demonstration for it instead of ranking
    await poll(driver, "return !!state.task", "the next task")
    demo_prompt = driver.execute_script("return state.task.prompt_id")
    assert demo_prompt == demo_group[0].prompt_id
    await asyncio.to_thread(driver.find_element("id", "write").click)
    await asyncio.to_thread(lambda: driver.find_element("id", "demo-text").send_keys("My **own** answer."))
    shot(driver, "task-demonstration")
    await asyncio.to_thread(driver.find_element("id", "demo-submit").click)
    await poll(driver, lambda: "Saved" in text_of(driver, "notice"), "the demonstration saved")
    await poll(driver, f"return !state.task || state.task.prompt_id !== '{demo_prompt}'", "the demo submitted")

    # GetConsensus and the export show them
    async with aio.insecure_channel(target) as ch:
        stub = preference_pb2_grpc.PreferenceServiceStub(ch)
        for g in groups:
            agg = await stub.GetConsensus(preference_pb2.GetConsensusRequest(prompt_id=g[0].prompt_id),
                                          metadata=auth(tokens["alice"]))
            assert agg.rater_ids == ["alice"] and agg.responses[0].response_id == g[1].rollout_id
        export = await stub.ExportDataset(preference_pb2.ExportDatasetRequest(),  # the default export dir
                                          metadata=auth(tokens["admin"]))
    pairs = read_pairs(export.pairs_uri)
    assert {g[0].prompt_id for g in groups} <= {p["prompt_id"] for p in pairs}
    demos = read_pairs(export.demonstrations_uri)
    assert any(d["prompt_id"] == demo_prompt and d["response_text"] == "My **own** answer." for d in demos)

    # the rater page
    await asyncio.to_thread(lambda: driver.find_element("css selector", "a[data-view=me]").click())
    await poll(driver, lambda: "Judged pairs" in text_of(driver, "me-table"), "the rater page")
    shot(driver, "rater-page")

    # a POST without the CSRF token is refused (and does nothing)
    leases = len(service.board.live_leases())
    status = await asyncio.to_thread(
        driver.execute_async_script,
        "const done = arguments[0]; fetch('/api/lease', {method: 'POST', credentials: 'same-origin', "
        "headers: {'Content-Type': 'application/json'}, body: '{}'}).then(r => done(r.status));")
    assert status == 403
    assert len(service.board.live_leases()) == leases

    # a revoked token ends the session on the next request
    store = TokenStore(service.settings.auth_db_path())
    store.revoke_rater("alice")
    store.close()
    await asyncio.to_thread(lambda: driver.find_element("css selector", "a[data-view=task]").click())
    await asyncio.to_thread(driver.find_element("id", "next").click)
    await poll(driver, lambda: "revoked" in text_of(driver, "error"), "the revoked-token message")
    assert driver.execute_script("return !document.getElementById('view-login').hidden")


async def test_expiry_two_raters_and_admin_page(browser, ui_service, kafka_bootstrap, unique):
    service, target, tokens, base = await ui_service(preference_task_overlap=1, preference_task_lease_s=3.0)
    [pair_group] = groups_for("ab" + unique, f"ab-{unique}", 1)  # older: alice's second task, in A/B mode
    await publish(service, kafka_bootstrap, [pair_group])
    [group] = groups_for(unique, f"v-{unique}", 1)
    await publish(service, kafka_bootstrap, [group])
    driver = browser
    await sign_in(driver, base, tokens["alice"])
    await poll(driver, "return !document.getElementById('view-task').hidden", "the task page")
    await asyncio.to_thread(driver.find_element("id", "next").click)
    await poll(driver, "return !!state.task", "a task")
    assert driver.execute_script("return state.task.prompt_id") == group[0].prompt_id
    async with aio.insecure_channel(target) as ch:
        stub = preference_pb2_grpc.PreferenceServiceStub(ch)
        # two raters never hold the same task: bob (overlap 1) gets something else while alice holds it
        other = await stub.LeaseTask(preference_pb2.LeaseTaskRequest(), metadata=auth(tokens["bob"]))
        assert (other.prompt_id, other.policy_version) != (group[0].prompt_id, group[0].policy_version)
        if other.lease_id:
            await stub.ReleaseTask(preference_pb2.ReleaseTaskRequest(lease_id=other.lease_id),
                                   metadata=auth(tokens["bob"]))
        await poll(driver, lambda: "Time is up" in text_of(driver, "timer"), "the lease to run out", 15)

        async def bob_gets_it():  # the expired task is back in the pool
            t = await stub.LeaseTask(preference_pb2.LeaseTaskRequest(), metadata=auth(tokens["bob"]))
            if t.lease_id and t.prompt_id != group[0].prompt_id:
                await stub.ReleaseTask(preference_pb2.ReleaseTaskRequest(lease_id=t.lease_id),
                                       metadata=auth(tokens["bob"]))
                return None
            return t.lease_id
        assert await wait_until_async(bob_gets_it, timeout_s=10, what="the expired task leased again")
    # alice's late ranking is still accepted, and counted late; her next task comes in A/B mode
    await asyncio.to_thread(lambda: driver.find_element("css selector", "#mode option[value=compare]").click())
    driver.execute_script("document.querySelector('#candidates .card').focus()")
    await rank_with_keyboard(driver, [1, 2, 3, 4])
    await poll(driver, lambda: "late" in text_of(driver, "notice"), "the late notice")
    assert service.board.counts["alice"].late == 1
    await poll(driver, "return !!state.task && state.task.kind === 'compare'", "an A/B task")
    assert driver.execute_script("return state.task.prompt_id") == pair_group[0].prompt_id
    assert len(driver.find_elements("css selector", "#candidates .card")) == 2
    shot(driver, "task-compare")
    from selenium.webdriver.common.action_chains import ActionChains

    await asyncio.to_thread(lambda: ActionChains(driver).send_keys("b").perform())
    await poll(driver, f"return !state.task || state.task.prompt_id !== '{pair_group[0].prompt_id}'", "A/B sent")
    [event] = [e for e in service.store.events(
        [r[0] for r in service.store._db.execute("SELECT event_id FROM events WHERE prompt_id = ?",
                                                 (pair_group[0].prompt_id,))]).values()]
    assert (event.kind, event.rater_id) == ("comparison", "alice")

    # the admin page
    await asyncio.to_thread(lambda: driver.find_element("id", "logout").click())
    await poll(driver, "return !document.getElementById('view-login').hidden", "signed out")
    await asyncio.to_thread(lambda: driver.find_element("id", "token").send_keys(tokens["admin"] + "\n"))
    await poll(driver, "return !document.getElementById('nav-admin').hidden", "the admin link")
    await asyncio.to_thread(lambda: driver.find_element("id", "nav-admin").click())
    await poll(driver, lambda: "alice" in text_of(driver, "raters"), "the rater table")
    await asyncio.to_thread(lambda: driver.find_element("id", "issue-rater").send_keys("carol\n"))
    await poll(driver, lambda: "fwp_" in text_of(driver, "issued"), "a token issued")
    shot(driver, "admin")
    carol = text_of(driver, "issued").split(": ", 1)[1].strip()
    check = TokenStore(service.settings.auth_db_path())
    assert check.lookup(carol).rater_id == "carol"
    check.close()


async def test_submission_during_restart_is_not_lost(browser, ui_service, kafka_bootstrap, unique, settings_factory):
    port = free_port()
    service, target, tokens, base = await ui_service(preference_task_overlap=1, preference_ui_port=port)
    [group] = groups_for(unique, f"v-{unique}", 1)
    await publish(service, kafka_bootstrap, [group])
    driver = browser
    await sign_in(driver, base, tokens["alice"])
    await poll(driver, "return !document.getElementById('view-task').hidden", "the task page")
    await asyncio.to_thread(driver.find_element("id", "next").click)
    await poll(driver, "return !!state.task", "a task")
    settings = service.settings
    await service.runtime.stop(grace=0)  # the service goes away while the rater works
    from selenium.webdriver.common.action_chains import ActionChains

    await asyncio.to_thread(lambda: ActionChains(driver).send_keys("1234\n").perform())
    await poll(driver, lambda: "kept" in text_of(driver, "error"), "the page saying the answer is kept")
    event_id = driver.execute_script("return JSON.parse(localStorage.getItem('fw_pending_submission')).event_id")
    restarted = build_service(settings)  # same home (store, sessions), same UI port
    await restarted.runtime.start()  # SERVING once the store caught up (its readiness condition)
    try:
        await wait_until_async(lambda: restarted.servicer.ready, what="the restarted service ready")
        await wait_until_async(lambda: restarted.store.events([event_id]), timeout_s=30,
                               what="the retried submission stored")
        await poll(driver, "return localStorage.getItem('fw_pending_submission') === null", "the retry acknowledged")
        assert restarted.store.count_events(prompt_id=group[0].prompt_id) == 1  # once, not twice
    finally:
        await restarted.runtime.stop(grace=0)
