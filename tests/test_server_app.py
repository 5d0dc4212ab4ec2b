"""The app as a whole (aios/server/app.py, routes/status.py): its OpenAPI document and
liveness.
"""

from __future__ import annotations

from servers import CHAT, OPENAI_CHAT, Harness


def test_openapi_schema(shared: Harness) -> None:
    response = shared.client().get("/openapi.json")
    assert response.status_code == 200
    schema = response.json()
    assert {CHAT, OPENAI_CHAT, "/api/v1/processes", "/v1/models"} <= set(schema["paths"])
    chat_in = schema["components"]["schemas"]["ChatIn"]
    assert "messages" in chat_in["required"]
    assert chat_in["additionalProperties"] is False
    assert schema["paths"]["/api/v1/processes"]["post"]["responses"].keys() >= {"202"}
    health = shared.client().get("/healthz").json()
    assert health["status"] == "ok" and health["cores"] == ["fake"]
