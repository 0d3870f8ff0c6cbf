from services.common.server import run
from services.mt.service import MtService
from services.mt.settings import MtSettings

if __name__ == "__main__":
    settings = MtSettings()
    run(lambda: MtService(settings), settings)
