from django.core.management.base import BaseCommand, CommandParser

from memories import accounts


class Command(BaseCommand):
    help = (
        "Create an API key for a tenant (the tenant is created if new). The key is the last line."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--tenant", required=True, help="Tenant name")
        parser.add_argument("--name", default="", help="A label for the key")

    def handle(self, *args: object, tenant: str, name: str, **options: object) -> None:
        tenant_obj = accounts.tenant_get_or_create(name=tenant)
        _, raw_key = accounts.api_key_create(tenant=tenant_obj, name=name)
        self.stderr.write(f"API key for tenant {tenant_obj.name!r} (shown once, stored hashed):")
        self.stdout.write(raw_key)
