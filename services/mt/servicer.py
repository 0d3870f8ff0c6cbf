"""MtService over gRPC: protobuf in, translator calls, protobuf out."""

from __future__ import annotations

import grpc

from services.common.batching import remaining_time
from services.mt.translator import TranslateJob, Translator
from speechmesh.mt.v1 import mt_pb2, mt_pb2_grpc


class MtServicer(mt_pb2_grpc.MtServiceServicer):
    def __init__(self, translator: Translator) -> None:
        self.translator = translator

    async def Translate(
        self, request: mt_pb2.TranslateRequest, context: grpc.aio.ServicerContext
    ) -> mt_pb2.TranslateResponse:
        job = TranslateJob(
            texts=list(request.texts),
            target_language=request.target_language,
            source_language=request.source_language,
            glossary=[(entry.source, entry.target) for entry in request.glossary],
            do_not_translate=list(request.do_not_translate),
            beam_size=request.beam_size,
        )
        results = await self.translator.translate(job, remaining_time(context))
        return mt_pb2.TranslateResponse(
            translations=[
                mt_pb2.Translation(
                    text=result.text,
                    source_language=result.source_language,
                    models=result.models,
                    cached=result.cached,
                )
                for result in results
            ]
        )

    async def ListLanguagePairs(
        self, request: mt_pb2.ListLanguagePairsRequest, context: grpc.aio.ServicerContext
    ) -> mt_pb2.ListLanguagePairsResponse:
        return mt_pb2.ListLanguagePairsResponse(
            pairs=[
                mt_pb2.LanguagePair(
                    source_language=route.source,
                    target_language=route.target,
                    models=route.models,
                    pivot=route.pivot is not None,
                    pivot_language=route.pivot or "",
                )
                for route in self.translator.routes()
            ]
        )
