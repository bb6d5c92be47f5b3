"""The canary audit (`fedlora audit`): what the server, the other sites and whoever holds the
final adapter can read back of one site's records, under each privacy setting.

- `canaries`: the planted secrets and their exposure (pure);
- `run`: the federations and the scoring.
"""
