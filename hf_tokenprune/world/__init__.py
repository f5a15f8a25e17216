"""A task-conditional visual QA world, the small VLMs trained on it, and their shipped weights."""
