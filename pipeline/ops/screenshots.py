"""Screenshots of the real UIs in Debian's Chromium, driven by Playwright (no browser download).

The end-to-end tests use these steps (and assert on what the pages show); ``make screenshots``
takes the README's pictures from a running ``make ui``:

    python -m pipeline.ops.screenshots --dagster http://127.0.0.1:3000 --mlflow http://127.0.0.1:5000 --out
    docs/screenshots
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

# Chromium on a machine without a network: no background connections, no sandbox as root
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
GROUPS = ("model", "data", "sweep")


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        raise RuntimeError("Debian's chromium is missing: `make setup` installs it (apt-get install chromium)")
    return path


@contextmanager
def browser_page(width: int = 1800, height: int = 1100):
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="medtune-chromium-") as profile, sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile,
            executable_path=chromium_path(),
            args=CHROMIUM_FLAGS,
            headless=True,
            viewport={"width": width, "height": height},
        )
        # Dagster's UI on localhost opens a "Join the Dagster community" dialog a second after the first
        # page renders, unless this key says it was seen; on a slow machine it came after any wait for it
        # and its backdrop swallowed the next click
        context.add_init_script("window.localStorage.setItem('communityNux', JSON.stringify('1'))")
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def open_asset_graph(page, dagster_url: str) -> None:
    """The global asset lineage with every group expanded, in the graph and in the asset tree."""
    page.goto(dagster_url + "/asset-groups", wait_until="networkidle")
    page.get_by_role("button", name="settings", exact=True).click()
    page.get_by_role("menuitem", name="Expand all groups").click()
    page.keyboard.press("Escape")
    for group in GROUPS:
        row = page.locator("[class*=AssetSidebarNode_itemContainer]").filter(has=page.locator(f'[title="{group}"]'))
        row.locator("button").first.click()
    page.wait_for_timeout(1000)


def graph_node_names(page) -> list[str]:
    # the zoomed-out graph shortens long names in the middle ("deduplica…_records")
    return page.locator("[class*=AssetNode_assetName]").all_inner_texts()


def open_asset(page, dagster_url: str, asset: str) -> None:
    page.goto(f"{dagster_url}/assets/{asset}", wait_until="networkidle")


def open_registered_model(page, mlflow_url: str, name: str = "medtune") -> None:
    page.goto(f"{mlflow_url}/#/models/{name}", wait_until="load")  # the MLflow UI polls: never network-idle
    page.get_by_text("Version 1").first.wait_for(timeout=60000)
    close_assistant(page)


def close_assistant(page) -> None:
    """The MLflow assistant's side panel, where it opens: closed, so the page shows whole."""
    close = page.get_by_role("button", name="Close")
    if close.count():
        try:
            close.first.click(timeout=2000)
        except Exception:
            pass


def champion_version(mlflow_url: str, name: str = "medtune") -> str:
    import json
    import urllib.request

    with urllib.request.urlopen(
        f"{mlflow_url}/api/2.0/mlflow/registered-models/alias?name={name}&alias=champion", timeout=30
    ) as r:
        return str(json.loads(r.read())["model_version"]["version"])


def open_model_version(page, mlflow_url: str, version: str, name: str = "medtune") -> None:
    """The version's page: its aliases, tags (the figures it was judged on) and the description
    that says why it took champion or stayed challenger."""
    page.goto(f"{mlflow_url}/#/models/{name}/versions/{version}", wait_until="load")
    page.get_by_text("held-out answer loss").first.wait_for(timeout=60000)


def version_run(mlflow_url: str, version: str, name: str = "medtune") -> tuple[str, str]:
    """(experiment id, run id) of the training run a registered version came from."""
    import json
    import urllib.request

    def get(path: str) -> dict:
        with urllib.request.urlopen(f"{mlflow_url}/api/2.0/mlflow/{path}", timeout=30) as r:
            return json.loads(r.read())

    run_id = get(f"model-versions/get?name={name}&version={version}")["model_version"]["run_id"]
    return get(f"runs/get?run_id={run_id}")["run"]["info"]["experiment_id"], run_id


def open_run(page, mlflow_url: str, experiment_id: str, run_id: str, tab: str = "") -> None:
    """A run's page (``tab``: ``artifacts/<path>``, or the overview with its datasets)."""
    page.goto(f"{mlflow_url}/#/experiments/{experiment_id}/runs/{run_id}/{tab}", wait_until="load")
    page.wait_for_timeout(3000)
    close_assistant(page)


def open_logged_model(page, mlflow_url: str, experiment_id: str, run_id: str) -> None:
    """The model the run logged: its own metrics (the tuned model's held-out figures, the base's apart)."""
    import json
    import urllib.request

    with urllib.request.urlopen(f"{mlflow_url}/api/2.0/mlflow/runs/get?run_id={run_id}", timeout=30) as r:
        outputs = json.loads(r.read())["run"].get("outputs", {}).get("model_outputs", [])
    page.goto(f"{mlflow_url}/#/experiments/{experiment_id}/models/{outputs[-1]['model_id']}", wait_until="load")
    page.wait_for_timeout(3000)
    close_assistant(page)


def open_table_compare(page, mlflow_url: str, experiment_id: str) -> None:
    """The training runs' artifact view: a logged table (the evaluation's rows) compared across runs."""
    page.goto(f"{mlflow_url}/#/experiments/{experiment_id}/runs", wait_until="load")
    page.wait_for_timeout(4000)
    close_assistant(page)
    page.locator("label:has(input[type=radio]), [role=radiogroup] *[role=radio]").nth(2).click(timeout=10000)
    page.wait_for_timeout(4000)


def open_traces(page, mlflow_url: str, experiment_id: str) -> None:
    page.goto(f"{mlflow_url}/#/experiments/{experiment_id}/traces", wait_until="load")
    page.wait_for_timeout(4000)
    got_it = page.get_by_role("button", name="Got it")  # a one-time tip over the list
    if got_it.count():
        got_it.first.click(timeout=2000)
    close_assistant(page)


def open_first_trace(page) -> None:
    """The newest trace of the list open: its span, inputs, outputs, token usage and latency."""
    page.locator("table tbody tr, [role=row]").nth(1).click(timeout=10000)
    page.wait_for_timeout(3000)


def take_all(dagster_url: str, mlflow_url: str, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    shots = []

    def shot(name: str) -> None:
        shots.append(out / name)
        page.screenshot(path=str(shots[-1]))

    with browser_page() as page:
        open_asset_graph(page, dagster_url)
        size = page.viewport_size  # the graph's zoom-out button, bottom right: two clicks show every group whole
        for _ in range(2):
            page.mouse.click(size["width"] - 28, size["height"] - 149)
            page.wait_for_timeout(500)
        shot("dagster-asset-graph.png")
        open_asset(page, dagster_url, "evaluation_report")
        page.get_by_text("side_by_side").first.wait_for(timeout=60000)
        page.get_by_text("choice_accuracy").first.scroll_into_view_if_needed()
        shot("dagster-evaluation-report.png")
        open_asset(page, dagster_url, "sweep_comparison")
        try:
            page.get_by_text("best_trial").first.wait_for(timeout=20000)
        except Exception:  # no sweep materialized in this instance: `make sweep` first
            print("sweep_comparison not materialized here: no sweep screenshot (run make sweep)")
        else:
            page.get_by_text("comparison", exact=True).first.scroll_into_view_if_needed()
            shot("dagster-sweep-comparison.png")
        open_registered_model(page, mlflow_url)
        page.wait_for_timeout(1500)
        shot("mlflow-model-page.png")
        version = champion_version(mlflow_url)
        open_model_version(page, mlflow_url, version)
        page.wait_for_timeout(1500)
        shot("mlflow-model-version.png")
        experiment_id, run_id = version_run(mlflow_url, version)
        open_run(page, mlflow_url, experiment_id, run_id)
        shot("mlflow-run-datasets.png")
        open_logged_model(page, mlflow_url, experiment_id, run_id)
        shot("mlflow-logged-model.png")
        open_run(page, mlflow_url, experiment_id, run_id, "artifacts/evaluation/rows.json")
        shot("mlflow-evaluation-rows.png")
        open_table_compare(page, mlflow_url, experiment_id)
        shot("mlflow-evaluation-compare.png")
        open_traces(page, mlflow_url, experiment_id)
        open_first_trace(page)
        shot("mlflow-trace.png")
    return shots


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dagster", default="http://127.0.0.1:3000")
    ap.add_argument("--mlflow", default="http://127.0.0.1:5000")
    ap.add_argument("--out", default="docs/screenshots")
    args = ap.parse_args(argv)
    for path in take_all(args.dagster, args.mlflow, Path(args.out)):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
