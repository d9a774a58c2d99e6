"""The controller's wire contract: config.proto, its generated code, the session, the client.

Regenerate the code with `federation/api/generate.sh` from the repository root. Importable by
every component; imports nothing of federation outside this package.
"""
