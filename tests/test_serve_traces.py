"""``make serve TRACE=1``: each answer an MLflow trace linked to the served model, with token counts
and latency; ``TRACE=redacted`` keeps the figures and drops the patients' text."""

import json

import pytest

from pipeline.ops.serve_traces import SPAN_NAME, TraceTarget, hidden, trace_answers

QUESTION = "咳嗽，咽喉肿痛，用什么中成药？"


@pytest.fixture
def store(tmp_path):
    """A fresh tracking store as the process's, restored after (traces go to the current store)."""
    import mlflow
    from conftest import mlflow_store

    before = mlflow.get_tracking_uri()
    uri = mlflow_store(tmp_path / "mlflow.db")
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    yield client, client.create_experiment("served", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_tracking_uri(before)


def traced_model(tiny_model_dir, tmp_path, target: TraceTarget):
    import mlflow
    from pipeline.stages.registered_model import pyfunc_model_kwargs

    path = tmp_path / "model"
    kwargs = pyfunc_model_kwargs(
        {"model": str(tiny_model_dir)}, system_prompt="", max_new_tokens=8, model_name="medtune"
    )
    mlflow.pyfunc.save_model(str(path), **kwargs)
    python_model = mlflow.pyfunc.load_model(str(path)).unwrap_python_model()
    trace_answers(python_model, target)
    return python_model


def traces(client, experiment_id: str) -> list:
    import mlflow

    mlflow.flush_trace_async_logging()
    return client.search_traces(locations=[experiment_id], max_results=50)


@pytest.mark.parametrize("redact", [False, True], ids=["text", "redacted"])
def test_each_answer_is_a_trace_with_its_tokens_and_model(tiny_model_dir, tmp_path, store, redact):
    from mlflow.tracing.constant import SpanAttributeKey, TraceMetadataKey

    client, experiment_id = store
    target = TraceTarget(experiment_id, "m-0123", {"medtune.served": "medtune@champion"}, redact)
    model = traced_model(tiny_model_dir, tmp_path, target)
    chat = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 5, "temperature": 1.5, "seed": 1}
    answer = model.predict(None, chat)
    assert model.predict(None, [QUESTION]) and list(model.predict_stream(None, chat))
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="role"):
        model.predict(None, {"messages": [{"role": "robot", "content": QUESTION}]})
    found = traces(client, experiment_id)
    assert len(found) == 4
    for trace in found:
        assert trace.info.trace_metadata[TraceMetadataKey.MODEL_ID] == "m-0123"
        assert trace.info.tags["medtune.served"] == "medtune@champion"
        (span,) = trace.data.spans
        assert span.name == SPAN_NAME and span.end_time_ns > span.start_time_ns
        text = json.dumps([span.inputs, span.outputs], ensure_ascii=False)
        assert (QUESTION in text) is not redact
    statuses = sorted(t.info.state.value if hasattr(t.info.state, "value") else str(t.info.state) for t in found)
    assert statuses.count("OK") == 3 and len(statuses) == 4
    usages = [t.data.spans[0].attributes.get(SpanAttributeKey.CHAT_USAGE) for t in found]
    assert {
        "input_tokens": answer["usage"]["prompt_tokens"],
        "output_tokens": 5,
        "total_tokens": 5 + answer["usage"]["prompt_tokens"],
    } in usages
    assert any(u and u.get("output_tokens") is not None and "input_tokens" not in u for u in usages)  # the stream


def test_redaction_keeps_shapes_and_figures():
    chat = {"messages": [{"role": "user", "content": "头痛"}], "max_tokens": 5}
    assert hidden(chat, True) == {
        "messages": [{"role": "user", "content": "[redacted: 2 characters]"}],
        "max_tokens": 5,
    }
    answer = {"choices": [{"message": {"role": "assistant", "content": "板蓝根"}}], "usage": {"total_tokens": 9}}
    assert hidden(answer, True)["usage"] == {"total_tokens": 9}
    assert "板蓝根" not in json.dumps(hidden(answer, True), ensure_ascii=False)
    assert hidden(chat, False) is chat
