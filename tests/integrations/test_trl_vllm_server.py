"""TRL's vLLM *server* mode (``use_vllm=True, vllm_mode="server"``) with ``GXPOGRPOTrainer``, against a small
stand-in server on 127.0.0.1 (vLLM itself cannot run here).

The stand-in answers the HTTP endpoints TRL's ``VLLMClient`` calls (``/health``, ``/v1/models``,
``/server_info``, ``/v1/completions`` with per-token sampled log-probs, ``/reset_prefix_cache``) by sampling
from its own copy of the policy. vLLM's NCCL weight transfer (``init_communicator`` / ``update_named_params``)
needs vLLM's own modules, so those two client methods are replaced by a copy of the streamed tensors into the
server's model; everything else (TRL's generation path, its importance-sampling correction from the server's
log-probs, the loss hook, the update rule) is the real code. The server serves a bounded number of requests and
stops by itself."""
import copy
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("requests")

from tests.integrations.test_trl import check_parity, gtrl, make_model, make_trainer  # noqa: E402

MAX_REQUESTS = 64
LIFETIME_S = 300.0


class StandInServer:
    """Answers TRL's VLLMClient protocol from ``model`` (sampling at the requested temperature)."""

    def __init__(self, model, eos_id):
        self.model, self.eos_id = copy.deepcopy(model).eval(), eos_id
        self.requests, self.lock = [], threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _reply(self, obj, code=200):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _count(self):
                with outer.lock:
                    outer.requests.append(self.path)
                    return len(outer.requests) <= MAX_REQUESTS

            def do_GET(self):
                if not self._count():
                    return self._reply({"error": "request budget spent"}, 503)
                path = self.path.split("?")[0]
                if path == "/health":
                    return self._reply({})
                if path == "/v1/models":
                    return self._reply({"data": [{"id": "stand-in"}]})
                if path == "/server_info":
                    return self._reply({"vllm_config": {"model_config": {"logprobs_mode": "processed_logprobs"},
                                                        "weight_transfer_config": {"backend": "stand-in"}}})
                if path == "/get_world_size":
                    return self._reply({"world_size": 1})
                return self._reply({"error": path}, 404)

            def do_POST(self):
                if not self._count():
                    return self._reply({"error": "request budget spent"}, 503)
                n = int(self.headers.get("Content-Length", 0))
                payload = json.loads(self.rfile.read(n) or b"{}")
                if self.path == "/v1/completions":
                    return self._reply({"choices": outer.complete(payload)})
                if self.path == "/reset_prefix_cache":
                    return self._reply({})
                return self._reply({"error": self.path}, 404)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.timer = threading.Timer(LIFETIME_S, self.stop)   # stops by itself even if the test hangs
        self.timer.daemon = True

    def __enter__(self):
        self.thread.start()
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        self.timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()

    @torch.no_grad()
    def complete(self, payload):
        """Prompt-major choices with the sampled ids and their processed (temperature-scaled) log-probs."""
        g = torch.Generator().manual_seed(len(self.requests))
        temp, n, max_tokens = float(payload["temperature"]), int(payload["n"]), int(payload["max_tokens"])
        choices = []
        for prompt in payload["prompt"]:
            for _ in range(n):
                ids, toks, lps = list(prompt), [], []
                for _ in range(max_tokens):
                    logits = self.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
                    logp = torch.log_softmax(logits / temp, -1)
                    t = int(torch.multinomial(logp.exp(), 1, generator=g))
                    ids.append(t)
                    toks.append(t)
                    lps.append(float(logp[t]))
                    if t == self.eos_id:
                        break
                choices.append({"prompt_token_ids": list(prompt), "token_ids": toks,
                                "logprobs": {"tokens": [f"token_id:{t}" for t in toks], "token_logprobs": lps,
                                             "top_logprobs": [None] * len(toks)}})
        return choices


def test_gxpo_trainer_in_vllm_server_mode(tmp_path, monkeypatch):
    import trl.generation.vllm_client as vc
    import trl.generation.vllm_generation as vg
    monkeypatch.setattr(vc, "is_vllm_available", lambda *a, **k: True)
    monkeypatch.setattr(vg, "is_vllm_available", lambda *a, **k: True)
    model = make_model()
    syncs = []
    with StandInServer(model, eos_id=1) as server:
        def init_communicator(self, device=0):
            syncs.append("init")

        def update_named_params(self, metadata, named_params):  # NCCL in vLLM: here a copy into the server
            own = dict(server.model.named_parameters())
            names = []
            for name, tensor in named_params:
                own[name].data.copy_(tensor)
                names.append(name)
            assert [m[0] for m in metadata] == names
            syncs.append(len(names))
        monkeypatch.setattr(vc.VLLMClient, "init_communicator", init_communicator)
        monkeypatch.setattr(vc.VLLMClient, "update_named_params", update_named_params)

        tr = make_trainer(tmp_path, cls=gtrl.GXPOGRPOTrainer, model=model, use_vllm=True, vllm_mode="server",
                          vllm_server_base_url=server.url, vllm_server_timeout=10, loss_type="grpo",
                          steps_per_generation=2, learning_rate=3e-2,
                          trainer_kwargs=dict(update="gxpo", update_kwargs={"gate": None, "backend": "torch"},
                                              backend="torch"))
        seen, real = [], tr._compute_loss

        def spy(m, inputs):
            seen.append((tr._gxpo_pass_index, copy.deepcopy(inputs)))
            return real(m, inputs)
        tr._compute_loss = spy
        t0 = time.time()
        tr.train()
        assert time.time() - t0 < LIFETIME_S
        served = list(server.requests)
    assert "/v1/completions" in served and "/reset_prefix_cache" in served and len(served) <= MAX_REQUESTS
    assert syncs[0] == "init" and len(syncs) >= 2 and syncs[1] == len(list(model.parameters()))
    assert tr.state.global_step == 2 and tr.gxpo_backward_passes == 6
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert [h["gxpo/backward_passes"] for h in logs] == [3, 3]
    step2 = [x for k, x in seen if k == 0][1]
    assert "importance_sampling_ratio" in step2 and step2.get("old_per_token_logps") is not None
    # the server sampled from the synced weights: the truncated IS ratio of step 1's batch is ~1
    step1 = seen[0][1]
    m = step1["completion_mask"].bool()
    assert (step1["sampling_per_token_logps"][m] - step1["old_per_token_logps"][m]).abs().max() < 1e-4 \
        if step1.get("old_per_token_logps") is not None else True
    # the hook's loss (with the server's IS correction) equals TRL's own on a server-generated batch
    tr._compute_loss = real
    check_parity(tr, step2)
