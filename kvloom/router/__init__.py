"""Routing a request to one of several served models: cheap query features (features.py), a contextual
bandit learning online from feedback (bandit.py), a confidence cascade (cascade.py), and the routes the
server offers (routes.py). The server glue is kvloom/server/multi_model.py."""
