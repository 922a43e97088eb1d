"""`vllm.inputs.TokensPrompt`: a dict of prompt token ids, as in vLLM."""


def TokensPrompt(prompt_token_ids):
    return {"prompt_token_ids": list(prompt_token_ids)}
