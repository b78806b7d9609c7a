"""One home per on-disk format: how its files are listed and cut into read units, how its
records are read, which keys they get, and which members or files are images.

  files       opening local and remote files (Beam only for remote ones)
  media       image file suffixes, webdataset image members, MIME types
  keys        image identity (`<file tag>/<corpus key>`), input roots and file tags,
              record sources (`path#rgN`) and image locators
  parquet     row-group units, row reads, image-column reads by row
  webdataset  tar samples, members located by offset and read back by one ranged read
  tfrecord    framed records with their CRCs checked
  shards      our own shards (any of the three): kind by name, units, located image reads

Every pipeline stage and the trainer read through these modules; none of them imports
Apache Beam (remote paths are opened through Beam's FileSystems only when one is given),
so the trainer and other tools can use them without a Beam install.
"""
