"""The agent's image store: signed, content-addressed image artefacts (see docs/images-store.md).

``manifest`` (the signed manifest and its strict parser), ``signing`` (Ed25519 keys),
``store`` (objects and images on disk), ``fetch`` (from a peer agent, resumable) and ``api``
(the routes on the agent's API).
"""
