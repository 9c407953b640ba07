"""kvloom on Ray: many engine instances behind one global scheduler, with live migration (Llumnix).

    engine_actor.EngineWorker   one Engine with its own step-loop thread (EngineActor: the Ray actor of it)
    dispatch                    pure placement policies over instances' load reports
    front.ClusterEngine         AsyncEngine's interface over N actors: dispatch, streaming, migrate()
"""
