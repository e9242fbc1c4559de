"""Less work per image: building blocks that change how much of the UNet runs on each denoising step.

- ``feature_cache``: DeepCache-style reuse of the deep UNet features between full steps.
- ``guidance_interval``: the unconditional (negative-prompt) branch only inside a guidance interval of the schedule.

Each works on a live diffusers pipeline or UNet, can be turned off exactly, and reports its own live state so that
a report row can be read back from the pipeline rather than from the plan.
"""
