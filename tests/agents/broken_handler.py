"""A handler module that is found (check-config passes) but fails when the agent imports it."""


def run(payload: object) -> object:
    return payload


raise RuntimeError("this module breaks on import")
