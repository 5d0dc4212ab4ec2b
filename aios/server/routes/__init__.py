"""The HTTP routes, one ``APIRouter`` per concern (and per OpenAPI tag). Each module's
``router(server)`` builds its routes around the given :class:`aios.server.session.Server`;
:func:`aios.server.app.create_app` includes them in order."""
