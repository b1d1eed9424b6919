"""The HydraModel: one base as policy, reference, reward model and critic; its heads, adapters and loading."""
