"""The registered policy as an MLflow pyfunc "model from code" (no pickled Python object).

    model = mlflow.pyfunc.load_model("models:/llm-refinery-policy@champion")
    model.predict(["Which module defines the function `dumps`?"])   # -> list of answers

The weights travel as the `policy` artifact (the safetensors folder of models/ppo); this file is the code.
mlflow's transformers flavour is not used: its pipeline import needs torchvision, which has no build
beside this machine's torch.
"""
from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class PolicyModel(PythonModel):
    def load_context(self, context):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = context.artifacts["policy"]
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).eval()

    def predict(self, context, model_input, params=None):
        import torch

        prompts = list(model_input["prompt"] if hasattr(model_input, "columns") else model_input)
        max_new = int((params or {}).get("max_new_tokens", 48))
        out = []
        for prompt in prompts:
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": str(prompt)}],
                                                     add_generation_prompt=True, return_tensors="pt",
                                                     return_dict=True)
            with torch.no_grad():
                gen = self.model.generate(**ids, max_new_tokens=max_new, do_sample=False,
                                          pad_token_id=self.tokenizer.pad_token_id)
            out.append(self.tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
        return out


mlflow.models.set_model(PolicyModel())
