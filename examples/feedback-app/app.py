"""An app that scores user-submitted text with Flywheel and records thumbs-up/down as feedback.

    FLYWHEEL_REWARD_TARGET=127.0.0.1:50052 FLYWHEEL_API_KEY=fwk_... \
    FLYWHEEL_PREFERENCE_TARGET=127.0.0.1:50053 FLYWHEEL_RATER_TOKEN=fwp_... \
    python examples/feedback-app/app.py --port 8090

Routes (JSON in, JSON out):
  POST /score     {"prompt": "...", "responses": ["...", "..."]}  -> {"scores": [...]}
  POST /feedback  {"prompt": "...", "responses": [a, b], "index": 0, "thumbs": "up"}
                  -> {"event_id": "...", "duplicate": false}
  GET  /          a small HTML page using both.

A thumbs-up on one of two shown answers says it is better than the other (thumbs-down: worse), so
it is recorded as a pairwise Comparison - the event the reward model trains on. The preference
service must allow free-text responses (FLYWHEEL_PREFERENCE_ALLOW_EXTERNAL_RESPONSES=true), since
these answers are not policy rollouts. The app submits as one rater (its token's).
"""

from __future__ import annotations

import argparse
import hashlib
import os

from aiohttp import web

from flywheel.client import AsyncPreferenceClient, AsyncRewardClient

PAGE = """<!doctype html><title>Flywheel feedback</title>
<textarea id=p placeholder=prompt></textarea><br><textarea id=a placeholder="answer A"></textarea>
<textarea id=b placeholder="answer B"></textarea><br><button onclick=score()>Score</button><pre id=out></pre>
<button onclick="vote(0)">&#128077; A</button><button onclick="vote(1)">&#128077; B</button>
<script>
const body = () => ({prompt: p.value, responses: [a.value, b.value]});
const post = (url, data) => fetch(url, {method: "POST", headers: {"Content-Type": "application/json"},
  body: JSON.stringify(data)}).then(r => r.json()).then(j => out.textContent = JSON.stringify(j, null, 1));
const score = () => post("/score", body());
const vote = (i) => post("/feedback", {...body(), index: i, thumbs: "up"});
</script>"""


def _prompt_id(prompt: str) -> str:
    return "app-" + hashlib.sha256(prompt.encode()).hexdigest()[:16]


def _fields(body: object, *, pair: bool) -> tuple[str, list[str]]:
    if not isinstance(body, dict) or not isinstance(body.get("prompt", ""), str):
        raise web.HTTPBadRequest(text='{"error": "prompt must be a string"}', content_type="application/json")
    responses = body.get("responses")
    if not (isinstance(responses, list) and responses and all(isinstance(r, str) and r for r in responses)
            and (len(responses) == 2 or not pair)):
        raise web.HTTPBadRequest(text='{"error": "responses must be %s non-empty strings"}' % ("2" if pair else "1+"),
                                 content_type="application/json")
    return body.get("prompt", ""), responses


def make_app(reward: AsyncRewardClient, preference: AsyncPreferenceClient) -> web.Application:
    async def page(request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    async def score(request: web.Request) -> web.Response:
        prompt, responses = _fields(await request.json(), pair=False)
        scores = await reward.score(prompt, responses)
        return web.json_response({"scores": [{"response": s.response, "score": s.score} for s in scores]})

    async def feedback(request: web.Request) -> web.Response:
        body = await request.json()
        prompt, (a, b) = _fields(body, pair=True)
        index, thumbs = body.get("index"), body.get("thumbs")
        if index not in (0, 1) or thumbs not in ("up", "down"):
            raise web.HTTPBadRequest(text='{"error": "index must be 0 or 1 and thumbs up or down"}',
                                     content_type="application/json")
        liked_a = (index == 0) == (thumbs == "up")
        ack = await preference.compare(_prompt_id(prompt), prompt, a, b, "a" if liked_a else "b")
        return web.json_response({"event_id": ack.event_id, "duplicate": ack.duplicate})

    app = web.Application(client_max_size=1024 * 1024)
    app.add_routes([web.get("/", page), web.post("/score", score), web.post("/feedback", feedback)])
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()

    async def build() -> web.Application:  # clients are created on the app's event loop
        reward = AsyncRewardClient(os.environ.get("FLYWHEEL_REWARD_TARGET", "127.0.0.1:50052"))  # $FLYWHEEL_API_KEY
        preference = AsyncPreferenceClient(os.environ.get("FLYWHEEL_PREFERENCE_TARGET", "127.0.0.1:50053"),
                                           api_key=os.environ.get("FLYWHEEL_RATER_TOKEN", ""))
        return make_app(reward, preference)

    web.run_app(build(), port=args.port)


if __name__ == "__main__":
    main()
