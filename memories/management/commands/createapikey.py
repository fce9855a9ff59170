from django.core.management.base import BaseCommand, CommandError, CommandParser

from memories import accounts
from memories.access import ADMIN, ROLES, grants_validate
from memories.errors import InvalidInput


class Command(BaseCommand):
    help = (
        "Create an API key for a tenant (the tenant is created if new). The key is the last line."
        " Without --role the key is an admin of its tenant."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--tenant", required=True, help="Tenant name")
        parser.add_argument("--name", default="", help="A label for the key")
        parser.add_argument("--role", choices=ROLES, default=ADMIN, help="admin (default)")
        parser.add_argument(
            "--grant",
            action="append",
            default=[],
            dest="grants",
            help="user:<id>, topic:<name>, shared:write or * (repeat for more)",
        )

    def handle(
        self, *args: object, tenant: str, name: str, role: str, grants: list[str], **options: object
    ) -> None:
        try:
            grants = grants_validate(grants)  # before the tenant is made
        except InvalidInput as exc:
            raise CommandError(exc.message) from exc
        tenant_obj = accounts.tenant_get_or_create(name=tenant)
        api_key, raw_key = accounts.api_key_create(
            tenant=tenant_obj, name=name, role=role, grants=grants
        )
        granted = f", grants {', '.join(api_key.grants)}" if api_key.grants else ""
        self.stderr.write(
            f"API key for tenant {tenant_obj.name!r}, role {api_key.role}{granted}"
            " (shown once, stored hashed):"
        )
        self.stdout.write(raw_key)
