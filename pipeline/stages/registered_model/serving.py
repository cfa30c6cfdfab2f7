"""The registered model's MLflow wrapper (a "model from code" file: MLflow copies this file into
the logged model, so ``mlflow.pyfunc.load_model("models:/medtune@champion")`` and
``mlflow models serve`` need only torch and transformers, not this project).

Two ways in, both answered in the training chat template with its system prompt:

- the chat-completions schema (what the OpenAI SDK, LangChain and curl examples send):
  ``{"messages": [{"role": "user", "content": "..."}], "max_tokens": 64}`` gives
  ``{"object": "chat.completion", "choices": [{"message": {"role": "assistant", "content": ...},
  "finish_reason": ...}], "usage": {...}}``. A system message in the request replaces the trained one.
- a list of questions (or a DataFrame with ``prompt``, or ``instruction`` and ``input``) gives a
  list of answers.

Decoding is greedy (the evaluation's) unless ``temperature`` is above 0. ``max_tokens``,
``temperature``, ``top_p``, ``top_k``, ``stop`` and ``n`` (1 only) are the model signature's params
(checked by MLflow), so they also reach a list of questions (``{"inputs": [...], "params": {...}}``).
``stream`` is refused: MLflow's scoring server answers whole responses only; ``predict_stream``
streams chunks in Python. A model logged as ``base`` + ``adapter`` (a prompt-learning adapter,
which cannot be merged) loads the base and attaches the adapter with peft.
"""

import contextvars
import threading
import time
import uuid

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

import mlflow

ROLES = ("system", "user", "assistant")
CHAT_KEYS = {
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop",
    "n",
    "stream",
    "seed",
}
IGNORED_KEYS = {"model", "user"}  # what OpenAI clients always send: one model is served here
MAX_QUESTIONS = 16  # questions in one list request: one request must not hold the model for long
MAX_TOKENS = 4096
# sampling draws from torch's one global generator: a seeded request holds it from its seed to its
# last token, so concurrent requests cannot change each other's answers (greedy ones never wait)
SAMPLING_LOCK = threading.Lock()


def bad_request(message: str) -> MlflowException:
    """MLflow's scoring server answers this with 400 and the message."""
    return MlflowException.invalid_parameter_value(message)


def check_messages(messages) -> list[dict]:
    if hasattr(messages, "tolist"):  # a numpy array from a DataFrame cell
        messages = messages.tolist()
    if not isinstance(messages, list) or not messages:
        raise bad_request('"messages" must be a non-empty list of {"role": ..., "content": ...} objects')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise bad_request(f'messages[{i}] must be an object with "role" and "content", got {m!r:.200}')
        if m["role"] not in ROLES:
            raise bad_request(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m['role']!r:.50}")
        content = m.get("content")
        if isinstance(content, list):  # content parts: [{"type": "text", "text": "..."}]
            parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(parts) != len(content) or not all(isinstance(t, str) for t in parts):
                raise bad_request(f"messages[{i}].content: only text parts are understood by this model")
            content = "".join(parts)
        if not isinstance(content, str):
            raise bad_request(f"messages[{i}].content must be a string, got {type(content).__name__}")
        out.append({"role": m["role"], "content": content})
    if out[-1]["role"] != "user":
        raise bad_request(
            f"the last message must be the user's (got {out[-1]['role']!r}): this model answers a user turn"
        )
    return out


class MedTuneChatModel(PythonModel):
    def load_context(self, context):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        config = context.model_config or {}
        self.system_prompt = config.get("system_prompt", "")
        self.max_new_tokens = int(config.get("max_new_tokens", 256))
        self.name = str(config.get("model_name", "medtune"))
        if "adapter" in context.artifacts:
            from peft import PeftModel

            folder = context.artifacts["adapter"]
            base = AutoModelForCausalLM.from_pretrained(
                context.artifacts["base"], dtype=torch.float32, use_safetensors=True
            )
            self.model = PeftModel.from_pretrained(base, folder)
            self.generation_config = base.generation_config
        else:
            folder = context.artifacts["model"]
            self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
            self.generation_config = self.model.generation_config
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.tokenizer.padding_side = "left"
        self.model.eval()

    # --- the two ways in -------------------------------------------------------------------
    def _questions(self, model_input):
        if isinstance(model_input, pd.DataFrame):
            if "prompt" in model_input:
                return model_input["prompt"].astype(str).tolist()
            if "instruction" not in model_input:
                raise bad_request(
                    f"a table needs a 'prompt' or an 'instruction' column, got {list(model_input.columns)}"
                )
            inputs = model_input["input"] if "input" in model_input else [""] * len(model_input)
            return [f"{i}\n{x}" if x else str(i) for i, x in zip(model_input["instruction"], inputs)]
        if isinstance(model_input, str):
            return [model_input]
        if isinstance(model_input, dict):
            raise bad_request(f'a chat request needs "messages"; got the keys {sorted(model_input)}')
        return [str(q) for q in model_input]

    def _chat_request(self, model_input, params: dict) -> tuple[list[dict], dict] | None:
        """(messages, settings) when ``model_input`` is a chat-completions request, else None."""
        if isinstance(model_input, pd.DataFrame) and "messages" in model_input:
            if len(model_input) != 1:
                raise bad_request("one chat request at a time")
            model_input = {k: v for k, v in model_input.iloc[0].to_dict().items() if v is not None}
        if not (isinstance(model_input, dict) and "messages" in model_input):
            return None
        unknown = set(model_input) - CHAT_KEYS - IGNORED_KEYS
        if unknown:
            raise bad_request(
                f"unknown chat-completions fields: {', '.join(sorted(unknown))} (understood: "
                f"{', '.join(sorted(CHAT_KEYS))})"
            )
        settings = {**params, **{k: v for k, v in model_input.items() if k in CHAT_KEYS and k != "messages"}}
        if settings.get("max_completion_tokens") is not None:  # the newer OpenAI name
            settings["max_tokens"] = settings["max_completion_tokens"]
        return check_messages(model_input["messages"]), settings

    def _settings(self, settings: dict) -> dict:
        """Generation keyword arguments from chat params (greedy unless temperature > 0)."""
        if settings.get("stream"):
            raise bad_request(
                '"stream": true is not served: MLflow\'s scoring server answers whole responses. '
                "Send stream false, or call predict_stream on the model loaded in Python."
            )
        if int(settings.get("n") or 1) != 1:
            raise bad_request('"n" must be 1: one answer per request')
        max_tokens = settings.get("max_tokens")
        max_tokens = self.max_new_tokens if max_tokens is None else max_tokens
        if not _whole(max_tokens) or not 1 <= max_tokens <= MAX_TOKENS:
            raise bad_request(f'"max_tokens" must be a whole number from 1 to {MAX_TOKENS}, got {max_tokens!r:.50}')
        gen = self.generation_config
        kwargs = {
            "max_new_tokens": int(max_tokens),
            "eos_token_id": gen.eos_token_id,
            "pad_token_id": gen.pad_token_id,
            "do_sample": False,
        }
        temperature = _number(settings, "temperature", 0.0)
        if not 0 <= temperature <= 2:
            raise bad_request(f'"temperature" must be from 0 to 2, got {temperature}')
        seed, top_p, top_k = settings.get("seed"), _number(settings, "top_p", 1.0), settings.get("top_k")
        if seed is not None and (not _whole(seed) or not 0 <= seed < 2**63):
            raise bad_request(f'"seed" must be a whole number from 0 to 2**63-1, got {seed!r:.50}')
        if not 0 < top_p <= 1:
            raise bad_request(f'"top_p" must be above 0 and at most 1, got {top_p}')
        if top_k is not None and (not _whole(top_k) or top_k < 0):
            raise bad_request(f'"top_k" must be a whole number, 0 or more, got {top_k!r:.50}')
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, seed=seed)
            if top_p < 1:
                kwargs["top_p"] = top_p
            if top_k:
                kwargs["top_k"] = int(top_k)
        stop = settings.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        kwargs["stop"] = [str(s) for s in stop if s]
        return kwargs

    def _context(self) -> int | None:
        """The longest sequence the model takes (prompt and answer), from its config."""
        config = getattr(self.model, "config", None)
        return getattr(config, "max_position_embeddings", None)

    # --- generation --------------------------------------------------------------------------
    def _messages(self, question: str) -> list[dict]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*messages, {"role": "user", "content": question}]

    def _prompt_ids(self, messages: list[dict]):
        if self.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False, return_tensors="pt")

    def _generate(self, ids, kwargs: dict, streamer=None) -> tuple[str, int, str]:
        """(answer, new tokens, finish reason) for one prompt."""
        import torch

        kwargs = dict(kwargs)
        stop, seed = kwargs.pop("stop"), kwargs.pop("seed", None)
        prompt, context = int(ids["input_ids"].shape[1]), self._context()
        if context and prompt + kwargs["max_new_tokens"] > context:
            raise bad_request(
                f"the prompt ({prompt} tokens) plus max_tokens ({kwargs['max_new_tokens']}) exceeds the model's "
                f"context of {context} tokens"
            )
        sampling = kwargs["do_sample"]
        # a seed forks the generator (the global one is left as it was); unseeded sampling draws on
        with (
            torch.no_grad(),
            SAMPLING_LOCK if sampling else _nothing(),
            torch.random.fork_rng(devices=[]) if seed is not None else _nothing(),
        ):
            if seed is not None:
                torch.manual_seed(int(seed))
            out = self.model.generate(**ids, **kwargs, streamer=streamer)
        # peft's prompt-learning generate may return the new tokens only, or the prompt and them
        new = out[0, ids["input_ids"].shape[1] :] if out.shape[1] > ids["input_ids"].shape[1] else out[0]
        n_new = int(new.shape[0])
        ended = n_new < kwargs["max_new_tokens"] or (
            n_new and int(new[-1]) in _ids(self.generation_config.eos_token_id)
        )
        answer = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        for s in stop:
            if s in answer:
                answer, ended = answer[: answer.index(s)], True
        return answer, n_new, "stop" if ended else "length"

    def predict(self, context, model_input, params=None):
        params = dict(params or {})
        chat = self._chat_request(model_input, params)
        if chat is not None:
            messages, settings = chat
            kwargs = self._settings(settings)
            ids = self._prompt_ids(messages)
            answer, n_new, finish = self._generate(ids, kwargs)
            return self._completion(answer, finish, int(ids["input_ids"].shape[1]), n_new)
        kwargs = self._settings(params)
        questions = self._questions(model_input)
        if len(questions) > MAX_QUESTIONS:
            raise bad_request(
                f"{len(questions)} questions in one request: at most {MAX_QUESTIONS}; send the rest in other requests"
            )
        return [self._generate(self._prompt_ids(self._messages(q)), kwargs)[0] for q in questions]

    def predict_stream(self, context, model_input, params=None):
        """Chat-completion chunks as the answer is generated (Python only: ``model.predict_stream``)."""
        from threading import Thread

        from transformers import TextIteratorStreamer

        chat = self._chat_request(model_input, dict(params or {}))
        if chat is None:
            questions = self._questions(model_input)
            if len(questions) != 1:
                raise bad_request("predict_stream answers one question at a time")
            chat = (self._messages(questions[0]), dict(params or {}))
        messages, settings = chat
        kwargs = self._settings({**settings, "stream": False})
        if kwargs["stop"]:
            raise bad_request('"stop" is not supported while streaming')
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        ids = self._prompt_ids(messages)
        failed = []

        def generate():
            try:
                self._generate(ids, kwargs, streamer)
            except BaseException as exc:  # end the stream, then raise it in the caller's thread
                failed.append(exc)
                streamer.end()

        # the caller's context (a server's per-request cancel flag) goes with the generation
        worker = Thread(target=contextvars.copy_context().run, args=(generate,), daemon=True)
        worker.start()
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        for piece in streamer:
            if piece:
                yield self._chunk(cid, created, {"role": "assistant", "content": piece}, None)
        worker.join()
        if failed:
            raise failed[0]
        yield self._chunk(cid, created, {}, "stop")

    def _completion(self, answer: str, finish: str, prompt_tokens: int, new_tokens: int) -> dict:
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": finish}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": new_tokens,
                "total_tokens": prompt_tokens + new_tokens,
            },
        }

    def _chunk(self, cid: str, created: int, delta: dict, finish) -> dict:
        return {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": self.name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(settings: dict, key: str, default: float) -> float:
    value = settings.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise bad_request(f'"{key}" must be a number, got {value!r:.50}')
    return float(value)


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def _ids(value) -> set[int]:
    return set(value) if isinstance(value, (list, tuple)) else {value}


mlflow.models.set_model(MedTuneChatModel())
