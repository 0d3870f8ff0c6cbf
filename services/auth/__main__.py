from services.auth.service import AuthService
from services.auth.settings import AuthSettings
from services.common.server import run

if __name__ == "__main__":
    settings = AuthSettings()
    run(lambda: AuthService(settings), settings)
