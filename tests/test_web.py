"""The web app in a real Chromium (Debian's package, driven by Playwright) against a real `rebasin serve`.

One server per module (embedded default, two tenants) and one on PostgreSQL + Redis + S3 (moto). Models are
small MLPs trained on digits in the test. Screenshots of the main screens go to REBASIN_SCREENSHOT_DIR when
set (docs/web-job.png was taken that way), else to the test's temporary directory.
"""

import json
import os
import re
from pathlib import Path

import httpx
import pytest
import torch
from playwright import sync_api as playwright_sync
from safetensors.torch import save as save_safetensors

from tests.conftest import S3_CREDENTIALS, Service, free_port
from tests.data_helpers import digits, trained
from tests.service_helpers import wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
KEYS = {"alice": "alice-key-0123456789", "bob": "bob-key-0123456789"}
SIZES = [64, 32, 10]
XSS = "<img src=x onerror=alert(1)>"
SCRIPT = "<script>document.title='pwned'</script>"


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{CHROMIUM} is missing; .ci/run installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    with playwright_sync.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("REBASIN_SCREENSHOT_DIR") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`rebasin serve` on the embedded default with two tenants' keys, shared by the module's tests."""
    root = tmp_path_factory.mktemp("web")
    api_keys = ",".join(f"{tenant}:{key}" for tenant, key in KEYS.items())
    service = Service(env={"REBASIN_DATA_DIR": str(root / "data"), "REBASIN_API_KEYS": api_keys}, log_dir=root)
    service.start_server()
    yield service
    service.stop()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Two checkpoints trained on digits (different seeds) and the digits dataset with its held-out split."""
    folder = tmp_path_factory.mktemp("files")
    x, y, xe, ye = digits()
    paths = {"a": folder / "model_a.safetensors", "b": folder / "model_b.safetensors", "data": folder / "digits.safetensors"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is many times faster on a loaded machine
    try:
        for name, seed in (("a", 1), ("b", 2)):
            paths[name].write_bytes(save_safetensors(trained("mlp", seed, epochs=8, sizes=SIZES)))
    finally:
        torch.set_num_threads(threads)
    paths["data"].write_bytes(save_safetensors({"inputs": x, "targets": y, "eval_inputs": xe, "eval_targets": ye}))
    return paths


def api_client(service: Service, tenant: str = "alice") -> httpx.Client:
    return service.client(headers={"Authorization": f"Bearer {KEYS[tenant]}"})


def sign_in(browser, service: Service, tenant: str = "alice"):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.goto(service.url + "/")
    page.get_by_label("API key").fill(KEYS[tenant])
    page.get_by_role("button", name="Sign in").click()
    page.locator("#tenant").filter(has_text=tenant).wait_for()
    return context, page


def choose(select, text: str):
    """Selects the option whose label contains text."""
    select.select_option(select.locator("option", has_text=text).first.get_attribute("value"))


def upload_in_page(page, kind: str, path: Path):
    page.goto(page.url.split("#")[0] + "#/files")
    page.set_input_files(f"#{kind}-file", str(path))
    section = page.locator(f"section#{kind}s")
    section.locator(".uploads li.done").filter(has_text=path.name).wait_for()
    section.locator("tbody tr").filter(has_text=path.name).first.wait_for()


def run_merge_in_page(page, service: Service, files: dict[str, Path], screenshots: Path, prefix: str) -> dict:
    """Uploads through the page, starts a weight-matching job with evaluation from the form, watches it succeed,
    and returns the job id with what the page shows of it."""
    for kind, name in (("checkpoint", "a"), ("checkpoint", "b"), ("dataset", "data")):
        upload_in_page(page, kind, files[name])
    assert "KiB" in page.locator("section#checkpoints .uploads li").first.inner_text()  # size and speed shown
    page.screenshot(path=str(screenshots / f"{prefix}-files.png"), full_page=True)

    page.goto(service.url + "/#/new")
    form = page.locator("#job-form")
    form.wait_for()
    choose(form.get_by_label("Model A"), files["a"].name)
    choose(form.get_by_label("Model B"), files["b"].name)
    form.locator('[data-field="architecture"] input').fill("mlp")
    form.locator('[data-field="architecture"] input').dispatch_event("change")
    # The architecture's sizes, as model A implies them, are the shown defaults.
    sizes = form.locator('[data-field="architecture.options.sizes"] input')
    page.wait_for_function("s => document.querySelector(s).value === '64,32,10'", arg='[data-field="architecture.options.sizes"] input')
    assert sizes.input_value() == "64,32,10"
    choose(form.locator('[data-field="eval_dataset"] select'), files["data"].name)
    form.locator('[data-field="options.lambdas"] input').fill("11")
    page.screenshot(path=str(screenshots / f"{prefix}-form.png"), full_page=True)
    form.get_by_role("button", name="Start merge").click()

    page.wait_for_url(re.compile(r"#/jobs/[^/]+$"))
    job_id = page.url.rsplit("/", 1)[1]
    page.locator("#result #barrier").wait_for(timeout=120_000)
    page.locator(".chart").hover(position={"x": 300, "y": 100})
    page.screenshot(path=str(screenshots / f"{prefix}-job.png"), full_page=True)
    shown = {
        pair: {metric: float(page.locator(f'#barrier tr[data-pair="{pair}"] td[data-metric="{metric}"]').inner_text())
               for metric in ("loss", "accuracy")}
        for pair in ("naive", "aligned")
    }
    return {"id": job_id, "barrier": shown, "readout": page.locator(".readout").inner_text()}


def check_merge(page, client: httpx.Client, outcome: dict):
    job = client.get(f"/v1/jobs/{outcome['id']}").json()
    assert job["status"] == "succeeded"
    assert page.locator(".badge").first.inner_text() == "succeeded"
    report = json.loads(client.get(f"/v1/jobs/{job['id']}/artifacts/report.json", follow_redirects=True).content)
    for pair, metrics in outcome["barrier"].items():
        for metric, value in metrics.items():
            assert value == pytest.approx(report["barrier"][pair][metric], rel=1e-3, abs=1e-6), (pair, metric)
    # A real barrier with these seeds, and alignment removes most of it.
    assert report["barrier"]["naive"]["loss"] > report["barrier"]["aligned"]["loss"]
    assert report["evaluation"]["split"] in page.locator("#result h3").first.inner_text()
    assert re.search(r"λ = [\d.]+ · naive: loss [\d.]+, accuracy [\d.]+ · aligned: loss [\d.]+, accuracy [\d.]+", outcome["readout"])

    with page.expect_download() as download_info:
        page.locator('a[data-artifact="merged.safetensors"]').click()
    downloaded = Path(download_info.value.path()).read_bytes()
    expected = client.get(f"/v1/jobs/{job['id']}/artifacts/merged.safetensors", follow_redirects=True).content
    assert downloaded == expected and len(expected) > 0


def test_merge_from_the_browser(browser, server, files, screenshots):
    context, page = sign_in(browser, server)
    outcome = run_merge_in_page(page, server, files, screenshots, "embedded")
    with api_client(server) as client:
        check_merge(page, client, outcome)
    # The jobs list shows it, newest first, and filters by status.
    page.goto(server.url + "/#/jobs?status=succeeded")
    page.locator("#jobs tbody tr").filter(has_text=outcome["id"]).wait_for()
    page.screenshot(path=str(screenshots / "embedded-jobs.png"), full_page=True)
    page.goto(server.url + "/#/jobs?status=failed")
    page.locator("text=No failed jobs.").wait_for()
    # A phone-width screen works too.
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(server.url + f"/#/jobs/{outcome['id']}")
    page.locator("#result #barrier").wait_for()
    assert page.evaluate("document.documentElement.scrollWidth") <= 400
    page.screenshot(path=str(screenshots / "embedded-job-phone.png"), full_page=True)
    context.close()


def test_auto_is_offered_first_once_a_dataset_is_chosen(browser, server, files):
    """Without a dataset the form offers the explicit methods (weight matching chosen); choosing a dataset puts
    "auto" first and chooses it, unless the user chose a method. The auto job's page lists every candidate."""
    with api_client(server) as client:
        for kind, name in (("checkpoints", "a"), ("checkpoints", "b"), ("datasets", "data")):
            client.post(f"/v1/{kind}", files={"file": (files[name].name, files[name].read_bytes())}).raise_for_status()
    context, page = sign_in(browser, server)
    page.goto(server.url + "/#/new")
    form = page.locator("#job-form")
    method = form.locator('[data-field="method"] select')
    method.wait_for()
    values = lambda: method.locator("option").evaluate_all("options => options.map(o => o.value)")
    assert values() == ["weight_matching", "activation_matching", "ste_matching"]
    assert method.input_value() == "weight_matching"
    choose(form.locator('[data-field="dataset"] select'), files["data"].name)
    assert values() == ["auto", "weight_matching", "activation_matching", "ste_matching", "zip"]
    assert method.input_value() == "auto"
    form.locator('[data-field="dataset"] select').select_option("")
    assert method.input_value() == "weight_matching" and "auto" not in values()
    method.select_option("activation_matching")  # the user's choice stays when a dataset is chosen
    choose(form.locator('[data-field="dataset"] select'), files["data"].name)
    assert method.input_value() == "activation_matching"
    method.select_option("auto")

    choose(form.get_by_label("Model A"), files["a"].name)
    choose(form.get_by_label("Model B"), files["b"].name)
    page.wait_for_function("s => document.querySelector(s).value !== ''", arg='[data-field="architecture.options.sizes"] input')
    form.locator('[data-field="options.lambdas"] input').fill("5")
    form.get_by_role("button", name="Start merge").click()
    page.wait_for_url(re.compile(r"#/jobs/[^/]+$"))
    page.locator("#result #candidates").wait_for(timeout=120_000)
    shown = page.locator("#candidates tbody tr").evaluate_all("rows => rows.map(r => r.dataset.candidate)")
    assert shown == ["weight_matching", "activation_matching", "ste_matching"]
    assert "not run" in page.locator('#candidates tr[data-candidate="ste_matching"]').inner_text()
    with api_client(server) as client:
        job = client.get(f"/v1/jobs/{page.url.rsplit('/', 1)[1]}").json()
    kept = job["result"]["auto"]["chosen"]
    assert "(kept)" in page.locator(f'#candidates tr[data-candidate="{kept}"]').inner_text()
    context.close()


def test_partial_merge_sweep_from_the_form_is_drawn(browser, server, files, screenshots, tmp_path):
    """options.merge_until and options.label_sets are in the form (label_sets typed as JSON); the sweep's joint
    accuracy and FLOPs per cut are drawn, beside the joint-accuracy table."""
    paths = {}
    for name, seed in (("deep_a", 3), ("deep_b", 4)):
        paths[name] = tmp_path / f"{name}.safetensors"
        paths[name].write_bytes(save_safetensors(trained("mlp", seed, epochs=4, sizes=[64, 32, 32, 10])))
    with api_client(server) as client:
        for path, kind in ((paths["deep_a"], "checkpoints"), (paths["deep_b"], "checkpoints"), (files["data"], "datasets")):
            client.post(f"/v1/{kind}", files={"file": (path.name, path.read_bytes())}).raise_for_status()
    context, page = sign_in(browser, server)
    page.goto(server.url + "/#/new")
    form = page.locator("#job-form")
    choose(form.get_by_label("Model A"), paths["deep_a"].name)
    choose(form.get_by_label("Model B"), paths["deep_b"].name)
    page.wait_for_function("s => document.querySelector(s).value !== ''", arg='[data-field="architecture.options.sizes"] input')
    choose(form.locator('[data-field="eval_dataset"] select'), files["data"].name)
    form.locator('[data-field="options.lambdas"] input').fill("3")
    form.locator('[data-field="options.merge_until"] input').fill("sweep")
    form.locator('[data-field="options.label_sets"] input').fill("[[0,1,2,3,4],[5,6,7,8,9]]")
    form.get_by_role("button", name="Start merge").click()
    page.wait_for_url(re.compile(r"#/jobs/[^/]+$"))
    page.locator("#result #sweep-chart").wait_for(timeout=120_000)
    page.screenshot(path=str(screenshots / "partial-sweep-job.png"), full_page=True)
    with api_client(server) as client:
        job = client.get(f"/v1/jobs/{page.url.rsplit('/', 1)[1]}").json()
    assert job["request"]["options"]["label_sets"] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    cuts = job["result"]["partial"]["cuts"]
    dots = page.locator("#sweep-chart circle[data-joint-accuracy]").evaluate_all(
        "dots => dots.map(d => [d.dataset.cut, Number(d.dataset.jointAccuracy)])")
    assert dots == [[c["module"], c["joint_accuracy"]] for c in cuts] and len(dots) == 2
    assert page.locator("#sweep-chart circle[data-flops-fraction]").count() == 2
    for model in ("ensemble", "full_merge"):
        shown = page.locator(f'#joint-accuracy tr[data-model="{model}"] td').inner_text()
        assert abs(float(shown) - job["result"]["joint_accuracy"][model]) < 1e-3
    context.close()


def test_invalid_job_shows_the_reason_beside_the_field(browser, server, files):
    context, page = sign_in(browser, server)
    with api_client(server) as client:
        for name in ("a", "b"):
            client.post("/v1/checkpoints", files={"file": (files[name].name, files[name].read_bytes())}).raise_for_status()
        jobs_before = len(client.get("/v1/jobs").json()["items"])
    page.goto(server.url + "/#/new")
    form = page.locator("#job-form")
    form.get_by_label("Model A").select_option(index=1)
    form.get_by_label("Model B").select_option(index=2)
    form.locator('[data-field="options.merge_lambda"] input').fill("5")
    form.get_by_role("button", name="Start merge").click()
    error = page.locator('[data-error-for="options.merge_lambda"]')
    error.filter(has_text="1").wait_for()
    assert "less than or equal to 1" in error.inner_text()
    assert form.locator('[data-field="options.merge_lambda"] input').get_attribute("aria-invalid") == "true"
    with api_client(server) as client:
        assert len(client.get("/v1/jobs").json()["items"]) == jobs_before
    context.close()


def test_resubmitting_after_a_lost_answer_creates_one_job(browser, server, files):
    with api_client(server) as client:
        ids = [client.post("/v1/checkpoints", files={"file": (files[n].name, files[n].read_bytes())}).json()["id"] for n in "ab"]
        jobs_before = {j["id"] for j in client.get("/v1/jobs?page_size=200").json()["items"]}
    context, page = sign_in(browser, server)
    keys = []

    def lose_first_answer(route):
        keys.append(route.request.headers.get("idempotency-key"))
        if len(keys) == 1:
            route.fetch()  # the server creates the job, but its answer never reaches the page
            route.abort("connectionreset")
        else:
            route.continue_()

    page.route("**/v1/jobs", lambda route: lose_first_answer(route) if route.request.method == "POST" else route.continue_())
    page.goto(server.url + "/#/new")
    form = page.locator("#job-form")
    form.get_by_label("Model A").select_option(ids[0])
    form.get_by_label("Model B").select_option(ids[1])
    page.wait_for_function("s => document.querySelector(s).value !== ''", arg='[data-field="architecture.options.sizes"] input')
    form.get_by_role("button", name="Start merge").click()
    page.locator('[data-error-for="request"]').filter(has_text="could not be reached").wait_for()
    form.get_by_role("button", name="Start merge").click()
    page.wait_for_url(re.compile(r"#/jobs/[^/]+$"))
    assert len(keys) == 2 and keys[0] and keys[0] == keys[1]
    with api_client(server) as client:
        created = {j["id"] for j in client.get("/v1/jobs?page_size=200").json()["items"]} - jobs_before
    assert created == {page.url.rsplit("/", 1)[1]}
    context.close()


def test_boolean_architecture_option_is_a_choice_sent_as_a_boolean(browser, server):
    """gpt's ``bias`` is a bool: the form offers true/false, shows the value model A implies (false here) and
    sends a JSON boolean, which the architecture checks (a "false" string would build biases). Start merge is
    clicked right after typing the architecture: focus leaving the name does not reset its options. The implied
    values asked for the architecture shown before (when model A was chosen) answer last, as on a busy server:
    they do not replace gpt's."""
    import matching

    with api_client(server) as client:
        ids = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            state = matching.build_model("gpt", vocab_size=16, block_size=8, n_embd=32, bias=False).state_dict()
            response = client.post("/v1/checkpoints", files={"file": (f"gpt-nobias-{seed}.safetensors", save_safetensors(state))})
            assert response.status_code == 201, response.text
            ids.append(response.json()["id"])
    context, page = sign_in(browser, server)
    stale = []
    page.route(re.compile(r"/v1/architectures/inferred-options\?"),
               lambda route: route.continue_() if "name=gpt&" in route.request.url else stale.append(route))
    page.goto(server.url + "/#/new")
    form = page.locator("#job-form")
    form.get_by_label("Model A").select_option(ids[0])
    form.get_by_label("Model B").select_option(ids[1])
    form.locator('[data-field="architecture"] input').fill("gpt")
    form.locator('[data-field="architecture"] input').dispatch_event("change")
    bias = form.locator('[data-field="architecture.options.bias"] select')
    page.wait_for_function("s => document.querySelector(s)?.value === 'false'", arg='[data-field="architecture.options.bias"] select')
    assert stale, "choosing model A asked for the options of the architecture shown then"
    for route in stale:
        with page.expect_response(lambda response: response.url == route.request.url):
            route.continue_()
    page.evaluate("() => new Promise((done) => setTimeout(done, 300))")  # the page handles those answers
    assert bias.input_value() == "false"
    assert bias.locator("option").all_inner_texts() == ["true", "false"]
    form.get_by_role("button", name="Start merge").click()
    page.wait_for_url(re.compile(r"#/jobs/[^/]+$"))
    with api_client(server) as client:
        job = wait_for(client, page.url.rsplit("/", 1)[1])
    assert job["request"]["architecture"]["options"]["bias"] is False
    assert job["status"] == "succeeded", job
    context.close()


def test_cancel_a_long_job_from_its_page(browser, server, files):
    context, page = sign_in(browser, server)
    page.goto(server.url + "/#/jobs")
    page.locator("#jobs").wait_for()
    with api_client(server) as client:
        ids = [client.post("/v1/checkpoints", files={"file": (files[n].name, files[n].read_bytes())}).json()["id"] for n in "ab"]
        data = client.post("/v1/datasets", files={"file": ("d.safetensors", files["data"].read_bytes())}).json()["id"]
        body = {"method": "ste_matching", "checkpoints": ids, "architecture": {"name": "mlp"}, "dataset": data,
                "options": {"steps": 100_000}}
        job = client.post("/v1/jobs", json=body).json()
        # The open jobs list shows the new job by itself, and then that it runs.
        page.locator("#jobs tbody tr").filter(has_text=job["id"]).filter(has_text="running").wait_for(timeout=60_000)
        assert page.locator("#jobs tbody tr").first.inner_text().startswith(job["id"])  # newest first
    # Its inputs cannot be deleted meanwhile: the API's 409, in words, beside the row.
    page.once("dialog", lambda dialog: dialog.accept())
    page.goto(server.url + "/#/files")
    row = page.locator(f'section#checkpoints tr[data-id="{ids[0]}"]')
    row.get_by_role("button", name="Delete").click()
    row.locator(".row-error").filter(has_text="Not deleted").wait_for()
    assert "queued or running job uses" in row.locator(".row-error").inner_text()

    page.goto(server.url + f"/#/jobs/{job['id']}")
    page.locator("#stage").filter(has_text="step").wait_for(timeout=30_000)  # live progress from the event stream
    page.locator("#cancel").click()
    page.locator("#job-cancelled").wait_for(timeout=30_000)
    assert page.locator(".badge").first.inner_text() == "cancelled"
    with api_client(server) as client:
        assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
    context.close()


def test_hostile_names_render_as_text(browser, server, files, tmp_path):
    with api_client(server) as client:
        client.post("/v1/checkpoints", files={"file": (files["a"].name, files["a"].read_bytes())}).raise_for_status()
        client.post("/v1/checkpoints", data={"name": XSS}, files={"file": ("x.safetensors", files["a"].read_bytes())}).raise_for_status()
        client.post("/v1/datasets", data={"name": SCRIPT}, files={"file": ("x.safetensors", files["data"].read_bytes())}).raise_for_status()
    context, page = sign_in(browser, server)
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(server.url + "/#/files")
    page.locator("section#checkpoints td.name").filter(has_text=XSS).wait_for()
    page.locator("section#datasets td.name").filter(has_text=SCRIPT).wait_for()
    page.goto(server.url + "/#/new")
    page.locator("#job-form").wait_for()
    assert XSS in page.locator('[data-field="checkpoints"]').inner_text()
    assert SCRIPT in page.locator('[data-field="eval_dataset"]').inner_text()

    # The API's refusal of a spec naming a hostile tensor, shown beside the spec field.
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"axes_to_perm": {"layers.0.weight": ["P_0", None], "layers.0.bias": ["P_0"],
                                                 "layers.1.weight": [None, "P_0"], "layers.1.bias": [None], XSS: [None]}}))
    form = page.locator("#job-form")
    choose(form.get_by_label("Model A"), XSS)
    choose(form.get_by_label("Model B"), "model_a")
    form.get_by_label("Permutation spec file").check()
    form.locator('[data-field="permutation_spec"] input').set_input_files(str(spec))
    form.get_by_role("button", name="Start merge").click()
    page.locator('[data-error-for="permutation_spec"]').filter(has_text=XSS).wait_for()

    # A failed job whose error carries markup (as a worker could report it, from user input).
    hostile = {"id": "job_hostile", "status": "failed", "method": "weight_matching", "created_at": "2026-01-01T00:00:00Z",
               "started_at": None, "finished_at": "2026-01-01T00:00:01Z", "progress": None, "result": None,
               "artifacts": [], "attempts": 1, "request": {"note": XSS},
               "error": {"type": "about:blank", "title": f"Failed {SCRIPT}", "status": 422, "detail": f"bad input {XSS}"}}
    page.route("**/v1/jobs/job_hostile", lambda route: route.fulfill(json=hostile))
    page.goto(server.url + "/#/jobs/job_hostile")
    page.locator("#job-error").wait_for()
    assert XSS in page.locator("#job-error").inner_text() and SCRIPT in page.locator("#job-error").inner_text()

    # Nothing was parsed as markup: no injected element exists, no script ran.
    assert page.locator('img[src="x"]').count() == 0
    assert page.evaluate("[...document.querySelectorAll('script')].every(s => s.src.endsWith('/app/app.js'))")
    assert page.title() != "pwned" and dialogs == []
    context.close()


ATTACK = """<!doctype html><html><body>
<form id="job" method="post" action="{api}/v1/jobs" enctype="text/plain">
  <input name='{{"checkpoints": ["{a}", "{b}"], "architecture": {{"name": "mlp"}}, "x": "' value='"}}'>
</form>
<script>
(async () => {{
  const results = [];
  const tryIt = async (what, init, url) => {{
    try {{ const r = await fetch(url, init); results.push(what + ":" + r.status); }} catch (e) {{ results.push(what + ":blocked"); }}
  }};
  const form = new FormData();
  form.append("file", new Blob([new Uint8Array([1, 2, 3])]), "evil.safetensors");
  await tryIt("upload", {{method: "POST", mode: "no-cors", credentials: "include", body: form}}, "{api}/v1/checkpoints");
  await tryIt("job", {{method: "POST", mode: "no-cors", credentials: "include", headers: {{"Content-Type": "text/plain"}},
    body: JSON.stringify({{checkpoints: ["{a}", "{b}"], architecture: {{name: "mlp"}}}})}}, "{api}/v1/jobs");
  await tryIt("delete", {{method: "DELETE", credentials: "include"}}, "{api}/v1/checkpoints/{a}");
  document.title = "done " + results.join(" ");
  document.getElementById("job").submit();
}})();
</script></body></html>"""


def test_cross_origin_posts_cannot_change_anything(browser, server, files):
    with api_client(server) as client:
        a, b = (client.post("/v1/checkpoints", files={"file": (files[n].name, files[n].read_bytes())}).json()["id"] for n in "ab")
        before = (client.get("/v1/jobs?page_size=200").json()["items"], client.get("/v1/checkpoints?page_size=200").json()["items"])
    context, page = sign_in(browser, server)
    # Another port on the same host: the same site to the browser, so the SameSite cookie is sent; only the
    # CSRF check stands between the page and the API.
    evil = f"http://127.0.0.1:{free_port()}/attack"
    page.route(evil, lambda route: route.fulfill(content_type="text/html", body=ATTACK.format(api=server.url, a=a, b=b)))
    page.goto(evil)
    page.wait_for_url(re.compile(r"/v1/jobs$"), timeout=15_000)  # the form post navigated to the API's answer
    answer = page.locator("body").inner_text()
    assert "Cross-origin request refused" in answer or "CSRF" in answer, answer
    with api_client(server) as client:
        after = (client.get("/v1/jobs?page_size=200").json()["items"], client.get("/v1/checkpoints?page_size=200").json()["items"])
        assert client.get(f"/v1/checkpoints/{a}").status_code == 200
    assert [j["id"] for j in after[0]] == [j["id"] for j in before[0]]
    assert [c["id"] for c in after[1]] == [c["id"] for c in before[1]]
    context.close()


def test_second_tenant_sees_nothing_and_sign_out_ends_access(browser, server, files):
    with api_client(server, "alice") as client:
        ids = [client.post("/v1/checkpoints", files={"file": (files[n].name, files[n].read_bytes())}).json()["id"] for n in "ab"]
        alice_job = client.post("/v1/jobs", json={"checkpoints": ids, "architecture": {"name": "mlp"}}).json()["id"]
        alice_checkpoints = client.get("/v1/checkpoints").json()["items"]
    context, page = sign_in(browser, server, "bob")
    page.goto(server.url + "/#/files")
    page.locator("text=No checkpoints yet.").wait_for()
    page.locator("text=No datasets yet.").wait_for()
    page.goto(server.url + "/#/jobs")
    page.locator("text=No jobs yet").wait_for()
    page.goto(server.url + f"/#/jobs/{alice_job}")
    page.locator(".problem").filter(has_text="Not found").wait_for()
    page.goto(server.url + "/#/new")
    page.locator("#job-form").wait_for()
    assert all(c["id"] not in page.content() for c in alice_checkpoints)

    # The session cookie is out of reach of scripts and of other sites.
    cookie = next(c for c in context.cookies() if c["name"] == "rebasin_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert "rebasin_session" not in page.evaluate("document.cookie")
    assert page.evaluate("fetch('/v1/checkpoints').then(r => r.status)") == 200

    copied = {"rebasin_session": cookie["value"]}
    assert httpx.get(f"{server.url}/v1/checkpoints", cookies=copied).status_code == 200
    page.get_by_role("button", name="Sign out").click()
    page.get_by_label("API key").wait_for()
    assert not any(c["name"] == "rebasin_session" for c in context.cookies())
    assert page.evaluate("fetch('/v1/checkpoints').then(r => r.status)") == 401
    # The session ended on the server: a copy of the cookie taken before sign-out is refused too.
    assert httpx.get(f"{server.url}/v1/checkpoints", cookies=copied).status_code == 401
    page.goto(server.url + "/#/files")
    page.get_by_label("API key").fill("not-a-key")
    page.get_by_role("button", name="Sign in").click()
    page.locator("#err-api_key").filter(has_text="not valid").wait_for()
    assert not any(c["name"] == "rebasin_session" for c in context.cookies())
    context.close()


@pytest.mark.parametrize("path, shown", [("/docs", ".opblock"), ("/redoc", "h2:has-text('Start a merge job')")])
def test_api_docs_render_without_network(browser, server, path, shown):
    context = browser.new_context()
    requested = []

    def only_loopback(route):
        host = httpx.URL(route.request.url).host
        requested.append(route.request.url)
        if host in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            route.abort()

    context.route("**/*", only_loopback)
    page = context.new_page()
    page.goto(server.url + path)
    page.locator(shown).first.wait_for(timeout=30_000)
    assert page.locator(shown).count() >= 1
    assert all(httpx.URL(url).host == "127.0.0.1" for url in requested), requested
    context.close()


def test_merge_from_the_browser_on_postgres_redis_s3(browser, make_production_service, s3_bucket, files, screenshots, tmp_path):
    import boto3

    endpoint, bucket = s3_bucket
    part = 5 * 1024 * 1024  # S3's smallest part: files from this size on go from the browser straight to S3
    service = make_production_service(
        REBASIN_ARTIFACT_URI=f"s3://{bucket}/rebasin", REBASIN_S3_ENDPOINT_URL=endpoint, REBASIN_DIRECT_UPLOAD_PART_BYTES=str(part),
        REBASIN_API_KEYS=f"alice:{KEYS['alice']}", **S3_CREDENTIALS,
    )
    boto3.client("s3", endpoint_url=endpoint).put_bucket_cors(Bucket=bucket, CORSConfiguration={"CORSRules": [
        {"AllowedOrigins": [service.url], "AllowedMethods": ["PUT"], "AllowedHeaders": ["*"], "ExposeHeaders": ["ETag"]}]})
    context, page = sign_in(browser, service)
    outcome = run_merge_in_page(page, service, files, screenshots, "production")
    with api_client(service) as client:
        check_merge(page, client, outcome)

    # A larger dataset goes through the presigned multipart flow: two parts PUT by the browser to S3 itself.
    generator = torch.Generator().manual_seed(0)
    large = tmp_path / "large.safetensors"
    large.write_bytes(save_safetensors({"inputs": torch.rand(24_000, 64, generator=generator),
                                        "targets": torch.randint(0, 10, (24_000,), generator=generator)}))
    puts = []
    page.on("request", lambda request: puts.append(request.url) if request.method == "PUT" else None)
    upload_in_page(page, "dataset", large)
    assert len(puts) == 2 and all(url.startswith(f"{endpoint}/{bucket}/") for url in puts), puts
    with api_client(service) as client:
        stored = next(d for d in client.get("/v1/datasets").json()["items"] if d["name"] == large.name)
    assert stored["num_examples"] == 24_000 and stored["size_bytes"] == large.stat().st_size
    context.close()


def test_the_wheel_carries_the_web_app(tmp_path):
    """`pip install .` ships the app's files (package data), so the installed server can serve them."""
    import shutil
    import subprocess
    import sys
    import zipfile

    from tests.conftest import REPO_ROOT

    source = tmp_path / "src"  # a copy: building writes build/ and *.egg-info beside the sources
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "tests", "benchmarks", "helm", "__pycache__", "build", "*.egg-info", ".rebasin"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source), "-w", str(tmp_path)],
                   check=True, timeout=300)
    names = zipfile.ZipFile(next(tmp_path.glob("rebasin-*.whl"))).namelist()
    static = sorted(p.name for p in (REPO_ROOT / "web" / "static").iterdir())
    assert static and all(f"web/static/{name}" in names for name in static), names


def test_a_model_folder_archive_uploads_from_the_page(browser, server, tmp_path):
    """The file picker takes a Hugging Face model folder as one archive; it becomes an hf-folder checkpoint."""
    import tarfile

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8, bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    archive = tmp_path / "gpt2-folder.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "gpt2", arcname="gpt2")
    context, page = sign_in(browser, server)
    page.goto(server.url + "/#/files")
    accepted = page.locator("#checkpoint-file").get_attribute("accept").split(",")
    assert {".tar", ".tar.gz", ".zip"} <= set(accepted), accepted
    upload_in_page(page, "checkpoint", archive)
    context.close()
    with api_client(server) as client:
        uploaded = [c for c in client.get("/v1/checkpoints").json()["items"] if c["name"] == archive.name]
    assert len(uploaded) == 1 and uploaded[0]["format"] == "hf-folder", uploaded
