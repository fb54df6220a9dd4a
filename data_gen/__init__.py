"""The synthetic world: users, devices, ads, impressions and their ground truth.

Every user's data is a pure function of ``(params, seed, user_id)`` (counter-based
random numbers, :mod:`data_gen.rng`), so any subset of any population can be
materialised alone. Entry points:

- :func:`data_gen.calibrate.build_world` — global tables of ``(WorldParams, seed)``,
  truth calibrated;
- :func:`data_gen.users.users_table`, :func:`data_gen.devices.devices_table`,
  :func:`data_gen.impressions.impressions_tables`, :func:`data_gen.requests.requests_table`,
  :func:`data_gen.ads.ads_table` — pure table builders for any user ids;
- :func:`data_gen.generate.generate` — stream a whole world to a dataset directory;
- :func:`data_gen.describe.describe` — statistics of a dataset directory.

Depends only on numpy, pyarrow and :mod:`adfed.data.schema` / :mod:`adfed.data.layout`.
"""
