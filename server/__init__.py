"""The SkillPack server: one resident base model, many SkillPacks per request."""
