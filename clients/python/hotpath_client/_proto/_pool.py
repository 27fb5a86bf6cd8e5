"""hotpath's own descriptor pool: the generated stubs register their files here."""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
