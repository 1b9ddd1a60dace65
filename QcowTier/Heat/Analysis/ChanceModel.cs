namespace QcowTier.Heat.Analysis;

/// <summary>
/// What a workload without skew looks like at a given size: operations falling on units uniformly at
/// random, so each unit's count is Poisson. A short trace of even I/O is lumpy by chance alone (at a few
/// operations a unit the hottest fifth of the units holds nearly a third of them), and the verdict must not
/// call that skew.
/// </summary>
internal static class ChanceModel
{
    /// <summary>The fraction of units that holds half the operations when <paramref name="ops"/> operations land uniformly on <paramref name="units"/> units.</summary>
    public static double UnitsForHalf(double ops, long units)
    {
        if (ops <= 0 || units <= 0)
        {
            return 0;
        }
        var lambda = ops / units;
        return lambda <= 500 ? ExactPoisson(lambda) : NormalApproximation(lambda);
    }

    /// <remarks>
    /// Units with count j hold a share j·P(j)/λ = P(j−1) of the operations, so the units with counts of k or
    /// more hold P(X ≥ k−1). Take whole count classes from the top while they hold under half, then the part
    /// of the next class that makes up the rest.
    /// </remarks>
    private static double ExactPoisson(double lambda)
    {
        var kmax = (int)Math.Ceiling(lambda + 12 * Math.Sqrt(lambda) + 20);
        var pmf = new double[kmax + 2];
        pmf[0] = Math.Exp(-lambda);
        for (var k = 1; k <= kmax + 1; k++)
        {
            pmf[k] = pmf[k - 1] * lambda / k;
        }
        var tail = new double[kmax + 3]; // tail[k] = P(X >= k)
        for (var k = kmax + 1; k >= 0; k--)
        {
            tail[k] = tail[k + 1] + pmf[k];
        }
        for (var k = kmax; k >= 1; k--)
        {
            if (tail[k - 1] >= 0.5)
            {
                return tail[k + 1] + (0.5 - tail[k]) * lambda / k;
            }
        }
        return 0.5;
    }

    /// <remarks>Above 500 operations a unit the Poisson law is normal to well within the verdict's margins.</remarks>
    private static double NormalApproximation(double lambda)
    {
        var sigma = Math.Sqrt(lambda);
        // Share of operations on units above z standard deviations: (1 − Φ(z)) + φ(z)·σ/λ; find where it is one half.
        double lo = -10, hi = 10;
        for (var i = 0; i < 100; i++)
        {
            var z = (lo + hi) / 2;
            var share = UpperTail(z) + Density(z) * sigma / lambda;
            if (share > 0.5)
            {
                lo = z;
            }
            else
            {
                hi = z;
            }
        }
        return UpperTail((lo + hi) / 2);
    }

    private static double Density(double z) => Math.Exp(-z * z / 2) / Math.Sqrt(2 * Math.PI);

    /// <summary>1 − Φ(z), from erfc (Abramowitz and Stegun 7.1.26, error under 1.5e-7).</summary>
    private static double UpperTail(double z)
    {
        var x = Math.Abs(z) / Math.Sqrt(2);
        var t = 1 / (1 + 0.3275911 * x);
        var erfc = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))) * Math.Exp(-x * x);
        return z >= 0 ? erfc / 2 : 1 - erfc / 2;
    }
}
