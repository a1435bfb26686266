"""Integrations with other frameworks. Each submodule imports its framework; import them explicitly
(`import peftkern.integrations.peft`) so that `import peftkern` never needs them."""
