package oip;

import java.net.HttpURLConnection;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import org.pytorch.serve.job.Job;
import org.pytorch.serve.wlm.BatchAggregator;
import org.pytorch.serve.wlm.Model;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * What happens to the requests a TorchServe worker thread holds when it is interrupted while its batch
 * fills (called by the {@code BatchAggregator.getRequest} that {@link HeldJobsPatch} installs).
 *
 * <p>TorchServe 0.12's worker thread takes the first queued job, then waits up to {@code maxBatchDelay}
 * for more; the jobs taken so far sit in the aggregator's {@code jobs} map. When the worker process
 * dies, the backend channel's close interrupts the thread; an interrupt during that wait leaves the
 * thread without a request object, so its "Worker died." path answers nothing, and its next
 * {@code getRequest} clears the map: those requests were never answered (the client waited out its
 * own timeout). They were never sent to a worker, so here they go back to the head of the model's
 * queue, in their order (what TorchServe does with a scaled-down worker's jobs), and the restarted
 * worker serves them.
 *
 * <p>When TorchServe stops a worker on purpose (scale-down, server stop), its {@code WorkerThread.shutdown()}
 * interrupts the thread and then returns the held jobs itself ({@code sendError(null, ...)}), from its own
 * thread, but only if the closing worker channel's listener has not taken the thread's reference first (a
 * race: when it loses, nobody returned them). Both paths now run under the aggregator's lock
 * ({@code sendError} is made synchronized) and empty the map, so whichever comes second finds nothing:
 * every held job goes back exactly once.
 *
 * <p>Only for the plain {@code BatchAggregator}: its subclasses (sequence, continuous and async
 * batching) keep jobs across calls or in job groups and keep TorchServe's own behaviour.
 */
public final class HeldJobs {

    private static final Logger logger = LoggerFactory.getLogger(HeldJobs.class);

    private HeldJobs() {}

    /** Called by the worker thread when its {@code getRequest} was interrupted; {@code jobs} are the held ones. */
    public static void requeue(BatchAggregator aggregator, Model model, Map<String, Job> jobs) {
        if (aggregator.getClass() != BatchAggregator.class || jobs == null) {
            return;
        }
        List<Job> held;
        synchronized (aggregator) { // the lock of the (patched, synchronized) sendError
            if (jobs.isEmpty()) {
                return;
            }
            held = new ArrayList<>(jobs.values());
            jobs.clear();
        }
        for (int i = held.size() - 1; i >= 0; i--) { // addFirst in reverse: the queue keeps their order
            Job job = held.get(i);
            if (job.isControlCmd()) {
                job.sendError(HttpURLConnection.HTTP_INTERNAL_ERROR, "Worker died.");
            } else {
                model.addFirst(job);
            }
        }
        logger.warn(
                "Worker of {} stopped while {} request(s) waited for their batch; put back at the head of its queue",
                model.getModelName(),
                held.size());
    }
}
