"""The registered model's MLflow wrapper (a "model from code" file: MLflow copies this file into
the logged model, so ``mlflow.pyfunc.load_model("models:/medtune@champion")`` needs only torch and
transformers, not this project).

``predict`` takes a list of questions (or a DataFrame with ``prompt``, or ``instruction`` and
``input``) and returns greedy answers in the training chat template with its system prompt.
A model logged as ``base`` + ``adapter`` (a prompt-learning adapter, which cannot be merged) loads
the base and attaches the adapter with peft.
"""

import pandas as pd
from mlflow.pyfunc import PythonModel

import mlflow


class MedTuneChatModel(PythonModel):
    def load_context(self, context):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        config = context.model_config or {}
        self.system_prompt = config.get("system_prompt", "")
        self.max_new_tokens = int(config.get("max_new_tokens", 256))
        if "adapter" in context.artifacts:
            from peft import PeftModel

            folder = context.artifacts["adapter"]
            base = AutoModelForCausalLM.from_pretrained(context.artifacts["base"], dtype=torch.float32, use_safetensors=True)
            self.model = PeftModel.from_pretrained(base, folder)
            self.generation_config = base.generation_config
        else:
            folder = context.artifacts["model"]
            self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
            self.generation_config = self.model.generation_config
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.tokenizer.padding_side = "left"
        self.model.eval()

    def _questions(self, model_input):
        if isinstance(model_input, pd.DataFrame):
            if "prompt" in model_input:
                return model_input["prompt"].astype(str).tolist()
            inputs = model_input["input"] if "input" in model_input else [""] * len(model_input)
            return [f"{i}\n{x}" if x else str(i) for i, x in zip(model_input["instruction"], inputs)]
        if isinstance(model_input, str):
            return [model_input]
        return [str(q) for q in model_input]

    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        import torch

        answers = []
        gen = self.generation_config
        for q in self._questions(model_input):
            messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            messages.append({"role": "user", "content": q})
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")
            with torch.no_grad():
                out = self.model.generate(
                    **ids, max_new_tokens=self.max_new_tokens, do_sample=False, eos_token_id=gen.eos_token_id, pad_token_id=gen.pad_token_id
                )
            # peft's prompt-learning generate may return the new tokens only, or the prompt and them
            new = out[0, ids["input_ids"].shape[1] :] if out.shape[1] > ids["input_ids"].shape[1] else out[0]
            answers.append(self.tokenizer.decode(new, skip_special_tokens=True).strip())
        return answers


mlflow.models.set_model(MedTuneChatModel())
