"""Framework integrations, one subpackage each. Today one: `integrations.diffusers`, steering
inside diffusers pipelines (`from safedig_kernels.integrations.diffusers import apply_safedig`)."""
