"""The oracle layer: every teacher and judge call goes through here (prompts, server, client)."""
