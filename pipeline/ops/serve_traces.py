"""MLflow traces of the answers ``make serve`` gives (opt-in: ``make serve TRACE=1``, or
``TRACE=redacted``).

Each answer, on ``/invocations`` or ``/v1`` and streamed or not, is one trace in the served model's
experiment, linked to its logged model (what the registered version points at), so the MLflow UI
lists a version's traffic beside its evaluation: the request and the answer, the latency (the
span's own), the prompt and answer token counts, the served name and version. The questions are
patients' questions: ``redacted`` keeps every figure and replaces the text of the messages and the
answers with its length.

Done around the loaded pyfunc's ``predict`` and ``predict_stream`` rather than in the logged model,
so versions registered before tracing existed are traced the same way. Traces are sent in the
background (MLflow's asynchronous trace logging): a slow store never delays an answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SPAN_NAME = "medtune.answer"


@dataclass(frozen=True)
class TraceTarget:
    """Where the traces go and what they are linked to."""

    experiment_id: str
    model_id: str | None = None  # the logged model a registered version points at
    tags: dict[str, str] = field(default_factory=dict)
    redact: bool = False


def hidden(value, redact: bool):
    """``value`` with every message's and answer's text replaced by its length, when ``redact``."""
    if not redact:
        return value
    if isinstance(value, str):
        return f"[redacted: {len(value)} characters]"
    if isinstance(value, dict):
        return {
            k: hidden(v, redact) if k in ("content", "messages", "choices", "message", "inputs") else v
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [hidden(v, redact) for v in value]
    if hasattr(value, "to_dict"):  # a DataFrame of questions
        return hidden(value.to_dict(orient="list"), redact)
    return value


def _usage(answer) -> dict | None:
    usage = answer.get("usage") if isinstance(answer, dict) else None
    if not usage:
        return None
    return {
        "input_tokens": usage.get("prompt_tokens"),
        "output_tokens": usage.get("completion_tokens"),
        "total_tokens": usage.get("total_tokens"),
    }


def trace_answers(python_model, target: TraceTarget) -> None:
    """Wrap the pyfunc's model so that each ``predict`` and ``predict_stream`` is a trace."""
    from mlflow.tracing.constant import SpanAttributeKey, TraceMetadataKey

    import mlflow

    metadata = {TraceMetadataKey.MODEL_ID: target.model_id} if target.model_id else {}
    predict, predict_stream = python_model.predict, python_model.predict_stream

    def start(model_input, params):
        return mlflow.start_span_no_context(
            SPAN_NAME,
            span_type="CHAT_MODEL",
            inputs={"request": hidden(model_input, target.redact), "params": params or {}},
            tags=target.tags,
            metadata=metadata,
            experiment_id=target.experiment_id,
        )

    def traced_predict(context, model_input, params=None):
        span = start(model_input, params)
        try:
            answer = predict(context, model_input, params)
        except BaseException as exc:
            span.set_status("ERROR")
            span.set_attribute("error", f"{type(exc).__name__}: {exc}"[:2000])
            span.end()
            raise
        if (usage := _usage(answer)) is not None:
            span.set_attribute(SpanAttributeKey.CHAT_USAGE, usage)
        span.set_outputs(hidden(answer, target.redact))
        span.end()
        return answer

    def traced_stream(context, model_input, params=None):
        span, pieces, status = start(model_input, params), [], "OK"
        try:
            for chunk in predict_stream(context, model_input, params):
                pieces.append(((chunk.get("choices") or [{}])[0].get("delta") or {}).get("content") or "")
                yield chunk
        except BaseException:
            status = "ERROR"
            raise
        finally:
            text = "".join(pieces)
            tokens = len(python_model.tokenizer(text, add_special_tokens=False)["input_ids"])
            span.set_attribute(SpanAttributeKey.CHAT_USAGE, {"output_tokens": tokens})
            span.set_outputs({"content": hidden(text, target.redact), "streamed_chunks": len(pieces)})
            span.set_status(status)
            span.end()

    python_model.predict, python_model.predict_stream = traced_predict, traced_stream
