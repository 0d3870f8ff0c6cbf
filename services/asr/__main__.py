from services.asr.service import AsrService
from services.asr.settings import AsrSettings
from services.common.server import run

if __name__ == "__main__":
    settings = AsrSettings()
    run(lambda: AsrService(settings), settings)
